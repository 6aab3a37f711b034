"""Where every artifact of a store lives: one module, so the whole layout reads in one place and no two callers
can disagree on a name.

    STORE/
      databases/<digest>/            the pruned-level database (database/store.py lays out its inside)
      teachers/<key>.safetensors     the dense model's compact teachers, by content
      generated/<key>.safetensors    rows of text the dense model wrote itself, for the search's selection
      dense-evaluations/<key>/       the dense model's evaluation (evaluation.json) and its teacher
      runs/<config digest>-<model>/  one compression: RunLayout below

Content-addressed places (`key`) depend only on the dense model and the rows, so runs with another seed,
fraction or schedule share them.
"""

from dataclasses import dataclass

from darwinlm.core import uri_io

EVALUATION = "evaluation.json"
TEACHER = "teacher.safetensors"


def databases(store_uri: str) -> str:
    return uri_io.join(store_uri, "databases")


def teacher(store_uri: str, key: str) -> str:
    return uri_io.join(store_uri, "teachers", f"{key}.safetensors")


def generated_rows(store_uri: str, key: str) -> str:
    return uri_io.join(store_uri, "generated", f"{key}.safetensors")


def dense_evaluation(store_uri: str, key: str) -> str:
    """The folder of one dense evaluation: EVALUATION (written last, the marker) and TEACHER."""
    return uri_io.join(store_uri, "dense-evaluations", key)


def readable_name(model: str) -> str:
    """A model's last path part (or hub id), safe in a path and in MLflow and Prefect names."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in model.strip("/").split("/")[-1])[:40]


def run_root(store_uri: str, config_digest: str, model: str) -> str:
    """A compression's folder, named by its config's digest and (readably) its model."""
    return uri_io.join(store_uri, "runs", f"{config_digest}-{readable_name(model)}")


@dataclass(frozen=True)
class RunLayout:
    """The files of one compression under its run root, in the order the stages write them."""

    root: str

    def file(self, name: str) -> str:
        return uri_io.join(self.root, name)

    @property
    def lock(self) -> str:  # held while a run is under way, so an identical twin waits and then finds it done
        return self.file("run.lock")

    @property
    def data(self) -> str:  # the data split and digests (prepare-data)
        return self.file("data.json")

    @property
    def own_teacher(self) -> str:  # the search's teacher of a run prepared before teachers were shared
        return self.file(TEACHER)

    @property
    def search_state(self) -> str:  # saved after every generation
        return self.file("search_state.json")

    @property
    def genome(self) -> str:  # the winner
        return self.file("genome.json")

    @property
    def refit_weights(self) -> str:
        return self.file("refit.safetensors")

    @property
    def refit_record(self) -> str:  # written after the weights: the marker
        return self.file("refit.json")

    @property
    def model(self) -> str:  # the exported HF folder; its config.json is written last
        return self.file("model")

    def gguf(self, quant: str) -> str:
        return self.file(f"model-{quant}.gguf")

    @property
    def evaluation(self) -> str:
        return self.file(EVALUATION)

    @property
    def registered(self) -> str:  # the MLflow registration's marker
        return self.file("registered.json")
