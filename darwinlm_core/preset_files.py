"""Where the presets shipped with darwinlm live, and their names: cheap to import (no torch), so a command line
can offer them before it loads anything."""

from pathlib import Path

PRESET_DIR = Path(__file__).parent / "presets"


def preset_names() -> list[str]:
    return sorted(path.stem for path in PRESET_DIR.glob("*.yaml"))
