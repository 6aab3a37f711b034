"""A miniature default text folder, laid out as darwinlm.flows.default_assets unpacks the real one."""

from pathlib import Path


def write_miniature_default_text(folder: Path, sotu: dict[str, str], moby_chapters: dict[int, str]) -> Path:
    """Write `sotu/<name>.txt` and `moby-dick/chapter_<n>.txt` as given, and one short file in each of the other
    out-of-domain folders (e-mail, the npm manual), which `default_split` requires too. Returns `folder`."""
    files = {f"sotu/{name}.txt": text for name, text in sotu.items()}
    files.update({f"moby-dick/chapter_{number}.txt": text for number, text in moby_chapters.items()})
    files["email/00001.abc.txt"] = "Martin posted: is this mountain limestone or granite? It will weather fast. " * 3
    files["npm-docs/commands/npm-install.txt"] = "Synopsis. This command installs a package and any packages that it depends on. " * 3
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    return folder
