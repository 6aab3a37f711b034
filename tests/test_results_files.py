"""Every committed results file is what its bench wrote, at the commit it records:

- the recorded commit exists in this repository's history, and the tree was clean;
- every key, at every depth, is one the bench's code *at that commit* can write (its own module and every module of
  the repository it imports, read with git, not today's files): a hand-merged row or an invented nested key fails;
- where the file carries a digest of its contents (`provenance.content_sha256`), the contents match it: a changed
  figure fails;
- the files `make bench` writes all record one commit.

The bench sources are read as text, through git (tests never import bench/)."""

import ast
import functools
import hashlib
import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
PROVENANCE_KEYS = {"commit", "dirty", "command", "config", "date", "machine", "seeds"}
# Written before every bench recorded provenance (or by an older version of its bench): each waits for its bench
# to be rerun at one commit (`make bench`), and must leave this set when it is.
AWAITING_REGENERATION: set[str] = set()
# Results files (names without .json) that `make bench` writes but that one run of it at one commit has not yet
# written: issue 37 made `make bench` one two-hour run, and the files committed before it were measured one by one,
# at different commits (headline.json did not exist). Empty it when that run lands, and the one-commit check is on.
AWAITING_HEADLINE_RUN: set[str] = {"headline", "database", "export", "gguf", "latency", "reliability"}
# Keys that are data the code cannot spell out, by bench: each entry is a place where the check is blind, so each
# says why, and test_each_data_key_exemption_is_used keeps the list from outliving its use.
DATA_KEYS = {
    # bench/scale.py's _stage_seconds names stage times f"{kind}_{stage}" from the pieces of Prefect task-run names
    # (tasks/stages.py: "select-g<generation>-s<stage>", "candidate-g<generation>-s<stage>-<index>")
    "scale": r"(?:select|candidate)_s\d+",
    # darwinlm_core/search/latency.py names each llama.cpp variant f"group{index}-{kind}-level{level}": the level is
    # an index into a ladder, data the code does not hold as a constant
    "latency": r"group\d+-(?:attn|mlp)-level\d+",
}
# The folders whose code a bench runs; the dotted name each is imported under.
PACKAGE_FOLDERS = {"bench": "bench", "darwinlm.core": "darwinlm_core", "darwinlm.tasks": "tasks",
                   "darwinlm.flows": "flows", "tests.support": "tests/support"}
NUMBER = r"-?\d+(?:\.\d+)?(?:e-?\d+)?"


def git(repository: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=repository, capture_output=True, text=True)


def commit_exists(repository: Path, commit: str) -> bool:
    return bool(re.fullmatch(r"[0-9a-f]{7,40}", commit)) and \
        git(repository, "cat-file", "-e", f"{commit}^{{commit}}").returncode == 0


def is_shallow(repository: Path) -> bool:
    """A shallow clone lacks old commits: a recorded commit that is missing there proves nothing."""
    return git(repository, "rev-parse", "--is-shallow-repository").stdout.strip() == "true"


@functools.lru_cache(maxsize=None)
def python_sources_at(repository: Path, commit: str) -> dict[str, tuple[str, str]]:
    """path -> (blob id, text) of every .py file of the code folders at `commit`, read in one git call."""
    folders = sorted({folder.split("/")[0] for folder in PACKAGE_FOLDERS.values()})
    listing = git(repository, "ls-tree", "-r", commit, "--", *folders).stdout.splitlines()
    blobs = {}
    for line in listing:
        meta, path = line.split("\t", 1)
        if path.endswith(".py") and meta.split()[1] == "blob":
            blobs[path] = meta.split()[2]
    if not blobs:
        return {}
    batch = subprocess.run(["git", "cat-file", "--batch"], cwd=repository, capture_output=True,
                           input="".join(f"{blob}\n" for blob in blobs.values()).encode()).stdout
    texts, offset = {}, 0
    for path, blob in blobs.items():
        header_end = batch.index(b"\n", offset)
        size = int(batch[offset:header_end].split()[2])
        texts[path] = (blob, batch[header_end + 1:header_end + 1 + size].decode())
        offset = header_end + 1 + size + 1  # the object is followed by a newline
    return texts


def module_paths(module: str, sources: dict) -> list[str]:
    """The files of the repository that importing `module` runs: its own and its packages' __init__.py."""
    for prefix, folder in PACKAGE_FOLDERS.items():
        if module == prefix or module.startswith(prefix + "."):
            parts = module[len(prefix):].strip(".").split(".") if module != prefix else []
            found = []
            for depth in range(len(parts) + 1):
                base = "/".join([folder, *parts[:depth]])
                found += [path for path in (f"{base}/__init__.py", f"{base}.py") if path in sources]
            return found
    return []


@functools.lru_cache(maxsize=None)
def imports_of(source: str) -> tuple[tuple[int, str], ...]:
    """(level, module) for every import in a source, inside functions too; `from m import n` gives m and m.n (a
    name may be a submodule)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(0, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            found += [(node.level, base)] + [(node.level, f"{base}.{alias.name}".strip(".")) for alias in node.names]
    return tuple(found)


def reached_modules(start: str, sources: dict) -> list[str]:
    """`start` and every file of the repository it imports, directly or not."""
    seen, todo = [], [start]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.append(path)
        package = path.removesuffix(".py").split("/")[:-1]  # the folder a relative import starts from
        for level, module in imports_of(sources[path][1]):
            if level:  # relative: from the package folder, up level - 1, as a dotted name
                folder = "/".join(package[:len(package) - level + 1])
                dotted = next((prefix for prefix, known in PACKAGE_FOLDERS.items()
                               if folder == known or folder.startswith(known + "/")), None)
                if dotted is None:
                    continue
                rest = folder[len(PACKAGE_FOLDERS[dotted]):].strip("/").replace("/", ".")
                module = ".".join(part for part in (dotted, rest, module) if part)
            todo += [found for found in module_paths(module, sources) if found not in seen]
    return seen


@functools.lru_cache(maxsize=None)
def results_names_at(repository: Path, commit: str) -> frozenset:
    listing = git(repository, "ls-tree", "--name-only", f"{commit}:bench/results").stdout.split()
    return frozenset(name.removesuffix(".json") for name in listing if name.endswith(".json"))


def bench_code(bench: str, sources: dict, repository: Path, commit: str) -> list[str]:
    """The files whose code wrote a results file of `bench`: the bench and all it imports, and, for every results
    file it reads (it names one, e.g. bench.scale copies search-gemma.json's rows), the code of the bench that
    wrote that one, as recorded in that file at `commit`."""
    files, benches = [], [bench]
    while benches:
        reached = reached_modules(benches.pop(), sources)
        files += [path for path in reached if path not in files]
        named = {name.removesuffix(".json") for path in reached for name in literals(sources[path][1])[0]}
        for stem in sorted(named & results_names_at(repository, commit)):
            shown = git(repository, "show", f"{commit}:bench/results/{stem}.json")
            if shown.returncode != 0:
                continue
            command = (json.loads(shown.stdout).get("provenance") or {}).get("command", "")
            other = re.match(r"python -m bench\.(\w+)", command)
            if other and f"bench/{other.group(1)}.py" in sources and f"bench/{other.group(1)}.py" not in files:
                benches.append(f"bench/{other.group(1)}.py")
    return files


@functools.lru_cache(maxsize=None)
def literals(source: str) -> tuple[frozenset, tuple, frozenset]:
    """What one file can produce as a key: its string constants (and their comma-separated parts: argparse
    defaults like "oneshot,trainaware"), its f-strings (as templates: constant parts, None for each hole), the
    keywords of its `dict(...)` and `.update(...)` calls, the fields of its classes (a dataclass or config model
    becomes a dict through asdict/to_dict), the argparse destinations of its `--option` strings (a bench records
    `vars(args)` as its config), and its numeric constants (fractions, seeds, bands that become keys). A string
    constant that is itself a Python program (a child script the code runs) is read the same way. A hole that is
    a module constant (`{TASK_PREFIX}`, bound once to a string) is read as that string."""
    strings, templates, numbers, format_specs = set(), [], set(), set()
    tree = ast.parse(source)
    named = {node.targets[0].id: node.value.value for node in tree.body
             if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
             and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            strings |= {node.value, *node.value.split(",")}
            if node.value.startswith("--"):
                strings.add(node.value[2:].replace("-", "_"))
            if "\n" in node.value:
                try:
                    inner = literals(node.value)
                except (SyntaxError, ValueError):
                    continue
                strings |= inner[0]
                templates += inner[1]
                numbers |= inner[2]
        elif isinstance(node, ast.Call) and (isinstance(node.func, ast.Name) and node.func.id == "dict" or
                                             isinstance(node.func, ast.Attribute) and node.func.attr == "update"):
            strings |= {keyword.arg for keyword in node.keywords if keyword.arg}
        elif isinstance(node, ast.ClassDef):
            strings |= {field.target.id for field in node.body
                        if isinstance(field, ast.AnnAssign) and isinstance(field.target, ast.Name)}
        elif isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) \
                and not isinstance(node.value, bool):
            numbers.add(float(node.value))
        elif isinstance(node, ast.JoinedStr) and id(node) not in format_specs:
            format_specs |= {id(part.format_spec) for part in node.values if isinstance(part, ast.FormattedValue)}
            parts = [part.value if isinstance(part, ast.Constant) else
                     named.get(part.value.id) if isinstance(part.value, ast.Name) and part.format_spec is None
                     and part.conversion == -1 else None for part in node.values]
            if len("".join(part for part in parts if part is not None)) >= 3:  # f"{a}{b}" joins any two names
                templates.append(tuple(parts))
    return frozenset(strings), tuple(templates), frozenset(numbers)


class WritableKeys:
    """The keys a set of source files can write. A key is writable when it is

    - a name the code spells: a string constant (or a keyword, field, option; see `literals`), or a word of the
      run's command line (`--methods oneshot`);
    - an f-string of the code whose every hole holds a writable key: f"ppl_{text}" writes "ppl_sotu" because the
      code spells "sotu", but not "ppl_sotuX";
    - data rather than a name: a number, or a range `a-b` of numbers, each of which the code holds as a constant or
      the command line gives (fractions removed, seeds, position bands);
    - or fits the bench's entry in DATA_KEYS.

    A key made of words the code never spells fails: names come from code, so an invented one is caught."""

    def __init__(self, sources: list[str], command: str = "", data_keys: str | None = None):
        self.strings, self.templates, self.numbers = set(), [], set()
        for source in sources:
            strings, templates, numbers = literals(source)
            self.strings |= strings
            self.templates += templates
            self.numbers |= numbers
        self.strings |= set(re.split(r"[\s,=]+", command))
        self.numbers |= {float(number) for number in re.findall(NUMBER, command)}
        self.data_keys = re.compile(data_keys or r"(?!)")
        shape = [re.compile("".join(re.escape(part) if part is not None else "(.+)" for part in template))
                 for template in self.templates]
        self.shapes = list(zip(self.templates, shape))
        self.any_shape = re.compile("|".join(f"(?:{pattern.pattern})" for _, pattern in self.shapes) or r"(?!)")
        self.known: dict[str, bool] = {}

    def __contains__(self, key: str) -> bool:
        if key not in self.known:
            self.known[key] = False  # a hole never holds its whole key (templates have constant parts)
            self.known[key] = (key in self.strings or self.is_data(key) or bool(self.data_keys.fullmatch(key))
                               or (bool(self.any_shape.fullmatch(key)) and any(
                                   pattern.fullmatch(key) and self.fills(template, key)
                                   for template, pattern in self.shapes)))
        return self.known[key]

    def is_data(self, key: str) -> bool:
        ends = re.fullmatch(f"({NUMBER})(?:-({NUMBER}))?", key)
        return ends is not None and all(float(end) in self.numbers for end in ends.groups() if end is not None)

    def fills(self, template: tuple, key: str) -> bool:
        """Whether `key` is `template` with a writable key in each hole (every way of splitting it is tried)."""
        if not template:
            return key == ""
        head, rest = template[0], template[1:]
        if head is not None:
            return key.startswith(head) and self.fills(rest, key[len(head):])
        return any(key[:end] in self and self.fills(rest, key[end:]) for end in range(1, len(key) + 1))


def key_paths(value, prefix: str = ""):
    """(dotted path, key) for every dict key at every depth; list items are walked as `path[]`."""
    if isinstance(value, dict):
        for key, inner in value.items():
            path = f"{prefix}.{key}" if prefix else key
            yield path, key
            yield from key_paths(inner, path)
    elif isinstance(value, list):
        for item in value:
            yield from key_paths(item, f"{prefix}[]")


def content_digest(results: dict) -> str:
    """sha256 of the canonical JSON (sorted keys, no whitespace) of a results file without its own digest. Written
    out here, not imported, so that the test is an independent statement of what bench/results_file.py records."""
    origin = {key: value for key, value in results.get("provenance", {}).items() if key != "content_sha256"}
    canonical = json.dumps({**results, "provenance": origin}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def results_file_problems(path: Path, repository: Path = ROOT) -> list[str]:
    """What is wrong with a results file, as one line each; [] when it is what its bench wrote at its commit."""
    results = json.loads(path.read_text())
    origin = results.get("provenance")
    if not isinstance(origin, dict):
        return [f"{path.name}: no provenance"]
    problems = [f"{path.name}: provenance lacks {key}" for key in sorted(PROVENANCE_KEYS - set(origin))]
    commit = origin.get("commit") or ""
    if origin.get("dirty") is not False or not commit:
        problems.append(f"{path.name}: not written at a commit of a clean tree")
    # Files written before the digest existed lack it: their keys and commit are still checked, their values not.
    if "content_sha256" in origin and origin["content_sha256"] != content_digest(results):
        problems.append(f"{path.name}: its contents differ from the digest its bench recorded")
    match = re.fullmatch(r"python -m bench\.(\w+)(?: .*)?", origin.get("command", ""))
    if match is None:
        return problems + [f"{path.name}: command {origin.get('command')!r} is not a bench"]
    if not commit_exists(repository, commit):
        return problems + [f"{path.name}: commit {commit!r} is not in this repository's history"]
    sources = python_sources_at(repository, commit)
    bench = f"bench/{match.group(1)}.py"
    if bench not in sources:
        return problems + [f"{path.name}: {bench} does not exist at {commit[:12]}"]
    writable = WritableKeys([sources[found][1] for found in bench_code(bench, sources, repository, commit)],
                            origin["command"], DATA_KEYS.get(match.group(1)))
    named = re.search(r" --results[ =](\S+)", origin["command"])  # a bench told where to write (search-gemma)
    if named is None and path.stem not in writable:
        problems.append(f"{path.name}: {bench} at {commit[:12]} cannot write {path.stem!r}")
    elif named is not None and named.group(1) != path.stem:
        problems.append(f"{path.name}: its command wrote {named.group(1)}.json")
    for dotted, key in key_paths(results):
        if key not in writable:
            problems.append(f"{path.name}: {bench} at {commit[:12]} cannot write {dotted!r}")
    return problems


def makefile_bench_results(makefile: str, bench_dir: Path = ROOT / "bench") -> list[str]:
    """The results files (names without .json) that the Makefile's `bench:` recipe writes: one per
    `python -m bench.X` whose module writes results (calls write_results; bench.report writes the docs page),
    named by its `--results NAME` or, without one, after its module. A bench run inside `$(...)` only prints
    (bench.gemma prints a model path)."""
    recipe = re.search(r"^bench:.*\n((?:\t.*\n?)*)", makefile, re.MULTILINE)
    names = []
    for line in (recipe.group(1).splitlines() if recipe else []):
        line = re.sub(r"\$\$\((?:[^()]|\([^()]*\))*\)", "", line.split("#", 1)[0])
        for run in re.finditer(r"python -m bench\.(\w+)([^;&|]*)", line):
            words = shlex.split(run.group(2))
            given = [words[i + 1] for i, word in enumerate(words[:-1]) if word == "--results"]
            given += [word.split("=", 1)[1] for word in words if word.startswith("--results=")]
            module = bench_dir / f"{run.group(1)}.py"
            if given or module.is_file() and "write_results(" in module.read_text():
                names.append(given[-1] if given else run.group(1))
    return names


def headline_commit_problems(names: list[str], results_dir: Path, awaiting: set[str]) -> list[str]:
    """Why the files named (less those awaiting the headline run) do not all exist and record one commit."""
    problems, commits = [], {}
    for name in names:
        if name in awaiting:
            continue
        path = results_dir / f"{name}.json"
        if not path.is_file():
            problems.append(f"{name}.json: `make bench` writes it, but it is not committed")
            continue
        commits[name] = (json.loads(path.read_text()).get("provenance") or {}).get("commit")
    if len(set(commits.values())) > 1:
        problems.append("`make bench` files record different commits: "
                        + ", ".join(f"{name}={str(commit)[:12]}" for name, commit in sorted(commits.items())))
    return problems


@pytest.mark.parametrize("path", sorted(RESULTS.glob("*.json")), ids=lambda path: path.name)
def test_each_results_file_is_what_its_bench_wrote_at_its_commit(path):
    if path.name in AWAITING_REGENERATION:
        pytest.skip("waits for `make bench` (see AWAITING_REGENERATION)")
    commit = (json.loads(path.read_text()).get("provenance") or {}).get("commit") or ""
    if not commit_exists(ROOT, commit) and is_shallow(ROOT):
        pytest.skip(f"this clone is shallow: {commit[:12] or 'no commit'} may be older than its history "
                    "(`git fetch --unshallow` to check)")
    assert results_file_problems(path) == []


def test_the_waiting_list_names_only_files_that_still_wait():
    for name in AWAITING_REGENERATION:
        path = RESULTS / name
        assert path.is_file(), f"{name} is gone: drop it from AWAITING_REGENERATION"
        assert results_file_problems(path), f"{name} is regenerated: drop it from the list"


def test_the_files_make_bench_writes_share_one_commit():
    names = makefile_bench_results((ROOT / "Makefile").read_text())
    assert names, "the Makefile's bench target writes no results file"
    assert AWAITING_HEADLINE_RUN <= set(names), \
        f"{sorted(AWAITING_HEADLINE_RUN - set(names))}: `make bench` no longer writes them; drop them from the list"
    assert headline_commit_problems(names, RESULTS, AWAITING_HEADLINE_RUN) == []
    if AWAITING_HEADLINE_RUN:
        # the wait ends with the run: once every file is there at one commit, the list must go
        assert headline_commit_problems(names, RESULTS, set()), "one commit for all: empty AWAITING_HEADLINE_RUN"
        pytest.xfail(f"not yet written by one `make bench` at one commit: {sorted(AWAITING_HEADLINE_RUN)}")


def test_each_data_key_exemption_is_used():
    for bench, pattern in DATA_KEYS.items():
        used = [path.name for path in RESULTS.glob("*.json")
                if (json.loads(path.read_text()).get("provenance") or {}).get("command", "").split(" ")[2:3]
                == [f"bench.{bench}"] and any(re.fullmatch(pattern, key) for _, key in key_paths(
                    json.loads(path.read_text())))]
        assert used, f"no results file of bench.{bench} has a key {pattern}: drop it from DATA_KEYS"


def deepest_row(value, path: str = "") -> tuple[dict, str]:
    """The most deeply nested dict of a results file (with keys), and its dotted path."""
    found = (value, path) if isinstance(value, dict) and value else (None, "")
    inner = value.values() if isinstance(value, dict) else value if isinstance(value, list) else []
    for key, item in (value.items() if isinstance(value, dict) else (("[]", item) for item in inner)):
        if key == "provenance":
            continue
        row, where = deepest_row(item, f"{path}.{key}" if path and key != "[]" else f"{path}{key}" if key == "[]"
                                 else key)
        if row is not None and depth(where) > depth(found[1]):
            found = (row, where)
    return found


def depth(path: str) -> int:
    """How deep a dotted path lies: -1 for the file's top level, 0 for one of its keys, and so on."""
    return path.count(".") + path.count("[]") if path else -1


def first_figure(value) -> tuple[dict, str] | None:
    """(the dict, its key) of the first number in a results file, outside its provenance."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else []
    for key, item in items:
        if isinstance(item, (int, float)) and not isinstance(item, bool) and isinstance(value, dict):
            return value, key
        found = first_figure(item) if key != "provenance" else None
        if found:
            return found
    return None


@pytest.mark.parametrize("path", sorted(RESULTS.glob("*.json")), ids=lambda path: path.name)
def test_the_check_fails_hand_edits_of_each_committed_file(path, tmp_path):
    """On a copy of each real file: an invented key beside its most deeply nested figures, a fake commit, and,
    once the copy carries a digest of its contents, a changed figure, each fail."""
    if not commit_exists(ROOT, (json.loads(path.read_text()).get("provenance") or {}).get("commit") or ""):
        pytest.skip("its commit is not in this clone (see the test above)")
    copy = tmp_path / path.name
    results = json.loads(path.read_text())
    row, where = deepest_row(results)
    invented = f"{sorted(row)[0]}X"
    row[invented] = 1.0
    copy.write_text(json.dumps(results))
    assert f"{path.name}: {results['provenance']['command'].split()[2].replace('.', '/')}.py at " \
           f"{results['provenance']['commit'][:12]} cannot write '{where}.{invented}'" in results_file_problems(copy)
    del row[invented]
    copy.write_text(json.dumps({**results, "provenance": {**results["provenance"], "commit": "0" * 40}}))
    mismatch = f"{path.name}: its contents differ from the digest its bench recorded"
    fake_commit = f"{path.name}: commit {'0' * 40!r} is not in this repository's history"
    # a file that carries a digest also no longer matches it: the commit is part of what the digest covers
    expected = [mismatch, fake_commit] if "content_sha256" in results["provenance"] else [fake_commit]
    assert results_file_problems(copy) == expected
    # (a digest added by hand to a file whose bench predates it is itself caught: that code cannot write the key)
    results["provenance"]["content_sha256"] = content_digest(results)
    copy.write_text(json.dumps(results))
    assert mismatch not in results_file_problems(copy)
    holder, figure = first_figure(results)
    holder[figure] += 1
    copy.write_text(json.dumps(results))
    assert mismatch in results_file_problems(copy)


# The checker itself, on a repository of its own: each hand edit it exists to catch, shown caught.

@pytest.fixture
def repository(tmp_path):
    """A git repository whose bench `speed` writes ratio, tokens_<name> and targets.<fraction>.<method>.ppl, and
    a results file it wrote at its commit (with the digest, as bench/results_file.py now records it)."""
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "__init__.py").write_text("")
    (tmp_path / "bench" / "speed.py").write_text(
        "from bench.rows import row\nfrom bench.results_file import write_results\n"
        "parser.add_argument('--reps')\n"
        'write_results("speed", {"ratio": 1.0, **{f"tokens_{name}": 0 for name in ("a",)},\n'
        '                        "targets": {str(f): {"uniform": row()} for f in args.targets}}, origin=origin)\n')
    (tmp_path / "bench" / "rows.py").write_text('def row():\n    return {"ppl_sotu": 1.0}\n')
    (tmp_path / "bench" / "results_file.py").write_text(  # the keys of provenance, as the real one writes them
        "def provenance():\n    return dict(commit=0, dirty=0, command=0, config=0, date=0, machine=0, seeds=0)\n"
        'def write_results(name, results, origin):\n    results = {**results, "provenance": origin}\n'
        '    origin["content_sha256"] = digest(results)\n')
    for command in (["init", "-q"], ["add", "."], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "b"]):
        assert git(tmp_path, *command).returncode == 0
    commit = git(tmp_path, "rev-parse", "HEAD").stdout.strip()
    origin = {"commit": commit, "dirty": False, "command": "python -m bench.speed --reps 3 --targets 0.5",
              "config": {"reps": 3}, "date": "2026-11-29", "machine": {}, "seeds": []}
    results = {"ratio": 1.2, "tokens_a": 5, "targets": {"0.5": {"uniform": {"ppl_sotu": 20.5}}}, "provenance": origin}
    results["provenance"] = {**origin, "content_sha256": content_digest(results)}
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "speed.json").write_text(json.dumps(results, indent=1))
    return tmp_path


def edited(repository: Path, edit) -> Path:
    path = repository / "results" / "speed.json"
    results = json.loads(path.read_text())
    edit(results)
    path.write_text(json.dumps(results))
    return path


def test_the_check_passes_what_the_bench_wrote(repository):
    assert results_file_problems(repository / "results" / "speed.json", repository) == []


def test_the_check_fails_an_invented_nested_key(repository):
    path = edited(repository, lambda results: results["targets"]["0.5"]["uniform"].update(ppl_sotuX=1.0))
    problems = results_file_problems(path, repository)
    assert any("cannot write 'targets.0.5.uniform.ppl_sotuX'" in problem for problem in problems), problems


def test_the_check_fails_an_invented_fraction_or_method(repository):
    """Numbers are data, but only numbers the code or the command holds: 0.7 was never asked for."""
    def invent(results):
        results["targets"]["0.7"] = {"uniform": {"ppl_sotu": 1.0}}
        results["targets"]["0.5"]["magic"] = {"ppl_sotu": 1.0}
    problems = results_file_problems(edited(repository, invent), repository)
    assert any("cannot write 'targets.0.7'" in problem for problem in problems), problems
    assert any("cannot write 'targets.0.5.magic'" in problem for problem in problems), problems


def test_the_check_fails_a_fake_commit(repository):
    path = edited(repository, lambda results: results["provenance"].update(commit="0" * 40))
    assert f"speed.json: commit {'0' * 40!r} is not in this repository's history" in \
        results_file_problems(path, repository)


def test_the_check_reads_the_code_at_the_recorded_commit(repository):
    """A key the code writes only after the recorded commit was not written by that run."""
    (repository / "bench" / "rows.py").write_text('def row():\n    return {"ppl_sotu": 1.0, "ppl_new": 2.0}\n')
    git(repository, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "later")
    path = edited(repository, lambda results: results["targets"]["0.5"]["uniform"].update(ppl_new=2.0))
    assert any("cannot write 'targets.0.5.uniform.ppl_new'" in problem
               for problem in results_file_problems(path, repository))


def test_the_check_fails_a_changed_value_when_the_file_has_a_digest(repository):
    path = edited(repository, lambda results: results["targets"]["0.5"]["uniform"].update(ppl_sotu=19.5))
    assert results_file_problems(path, repository) == [
        "speed.json: its contents differ from the digest its bench recorded"]


def test_the_check_fails_other_hand_edits(repository):
    written = (repository / "results" / "speed.json").read_text()
    for edit, problem in (
            (lambda r: r.update(overhead_from_another_run=0.1), "cannot write 'overhead_from_another_run'"),
            (lambda r: r["provenance"].update(dirty=True), "speed.json: not written at a commit of a clean tree"),
            (lambda r: r["provenance"].update(command="python -m bench.nope"), "bench/nope.py does not exist"),
            (lambda r: r.pop("provenance"), "speed.json: no provenance")):
        (repository / "results" / "speed.json").write_text(written)
        edited_path = edited(repository, lambda results: (results["provenance"].pop("content_sha256"), edit(results)))
        assert any(problem in found for found in results_file_problems(edited_path, repository)), problem
    renamed = repository / "results" / "speed-long.json"  # a bench told where to write: the name is the command's
    for name, problems in (("speed-long", []), ("other", ["speed-long.json: its command wrote other.json"])):
        results = json.loads(written)
        results["provenance"].update(command=f"{results['provenance']['command']} --results {name}")
        results["provenance"].pop("content_sha256")
        renamed.write_text(json.dumps(results))
        assert results_file_problems(renamed, repository) == problems


def test_the_headline_check_reads_the_makefile_and_fails_two_commits(tmp_path):
    makefile = ("bench: setup\n"
                "\t.venv/bin/python -m bench.headline            # ~90 min\n"
                "\t.venv/bin/python -m bench.search --model \"$$(.venv/bin/python -m bench.gemma)\" --results sg\n"
                "\t.venv/bin/python -m bench.gguf --reps 5\n"
                "\ntest:\n\t.venv/bin/python -m bench.not_bench\n")
    (tmp_path / "bench").mkdir()
    for module, code in (("headline", "write_results('headline', rows)"), ("search", "write_results(args.results)"),
                         ("gguf", "write_results('gguf', rows)"), ("gemma", "print(path)")):
        (tmp_path / "bench" / f"{module}.py").write_text(code)
    assert makefile_bench_results(makefile, tmp_path / "bench") == ["headline", "sg", "gguf"]
    for name, commit in (("headline", "a" * 40), ("sg", "a" * 40), ("gguf", "b" * 40)):
        (tmp_path / f"{name}.json").write_text(json.dumps({"provenance": {"commit": commit}}))
    names = makefile_bench_results(makefile, tmp_path / "bench")
    assert headline_commit_problems(names, tmp_path, set()) == [
        f"`make bench` files record different commits: gguf={'b' * 12}, headline={'a' * 12}, sg={'a' * 12}"]
    assert headline_commit_problems(names, tmp_path, {"gguf"}) == []
    (tmp_path / "sg.json").unlink()
    assert headline_commit_problems(names, tmp_path, {"gguf"}) == [
        "sg.json: `make bench` writes it, but it is not committed"]
