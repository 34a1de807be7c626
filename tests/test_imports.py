"""The package's import graph runs one way (README "Layout"): models <- sampling <- {sft, rl},
evaluation <- {envs, episodes, sampling}, train/ shared by both arms, nothing imports commands/, and
the ops seam is the only importer of the native kernels.

Read from the source with `ast` (every import statement, including the lazy ones inside
functions), so a backwards import fails here before it becomes a cycle or a layering leak."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "sftrl_jax"

# unit -> the units it may import (a unit is a subpackage or a top-level module of sftrl_jax).
_BASE = {"errors", "config", "integrity", "progress"}
ALLOWED = {
    "__init__": {"hostmem"},
    "errors": set(),
    "config": {"errors"},
    "integrity": {"errors"},  # the sha256 records of shipped folders, checked at load
    "progress": set(),  # a tqdm bar on a terminal, a plain line per interval in a log
    "hostmem": set(),
    "kernels": set(),
    "parallel": {"errors"},
    "ops": {"kernels", "parallel"},
    "models": _BASE | {"parallel", "ops"},
    "envs": _BASE,
    "data": _BASE | {"envs"},
    "sampling": _BASE | {"models", "data", "parallel", "ops"},
    "episode_checks": _BASE,  # what the episode runner accepts from an env
    "episodes": _BASE | {"parallel", "episode_checks"},  # parallel.distributed: the multi-process exchange
    "evaluation": _BASE | {"envs", "episodes", "sampling", "data", "models"},
    "train": _BASE | {"models", "data", "parallel", "ops"},
    "sft": _BASE | {"models", "sampling", "data", "parallel", "ops", "train", "evaluation"},
    "rl": _BASE | {"models", "sampling", "data", "parallel", "ops", "train", "evaluation", "envs", "episodes"},
    # `sftrl study` runs both arms and the evaluation (`sftrl demo` is one study config)
    "study": _BASE | {"models", "sampling", "data", "parallel", "train", "evaluation", "envs", "sft", "rl"},
    # `sftrl plan`: compiles both arms' programs abstractly, so it sits above them (like the study)
    "planning": _BASE | {"models", "ops", "parallel", "sampling", "data", "train", "sft", "rl"},
    "commands": set(),  # filled below: the CLI's commands may import anything but each other's callers
    "cli": _BASE | {"commands"},
}
ALLOWED["commands"] = set(ALLOWED) - {"__init__", "cli", "commands", "kernels"}


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _module_name(path: pathlib.Path, package: pathlib.Path) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path, module: str) -> list[tuple[str, int]]:
    """(imported sftrl_jax module, line) of every import statement in the file."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the file's package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            if base == "sftrl_jax":  # `from sftrl_jax import envs, ops`: each name is a unit
                out += [(f"sftrl_jax.{a.name}", node.lineno) for a in node.names]
            else:
                out.append((base, node.lineno))
    return [(m, line) for m, line in out if m == "sftrl_jax" or m.startswith("sftrl_jax.")]


def import_violations(package: pathlib.Path = PACKAGE) -> list[str]:
    """Every import that the graph of `ALLOWED` does not allow, as 'file:line: a -> b'."""
    bad = []
    for path in sorted(package.rglob("*.py")):
        module = _module_name(path, package)
        src = _unit(module)
        if src not in ALLOWED:
            bad.append(f"{path.relative_to(package.parent)}: unit {src!r} is not in the import contract (ALLOWED)")
            continue
        for target, line in _imports(path, module):
            dst = _unit(target)
            if dst != src and dst not in ALLOWED[src]:
                bad.append(f"{path.relative_to(package.parent)}:{line}: {src} -> {dst} ({target})")
    return bad


def test_the_import_graph_runs_one_way():
    bad = import_violations()
    assert not bad, "imports against the layering (README 'Layout'):\n" + "\n".join(bad)


def test_the_contract_is_acyclic():
    """The allowed graph itself has no cycle, so the layering is a real order."""
    seen, done = set(), set()

    def visit(u, stack):
        if u in done:
            return
        assert u not in seen, f"cycle in ALLOWED: {' -> '.join([*stack, u])}"
        seen.add(u)
        for v in ALLOWED[u]:
            visit(v, [*stack, u])
        done.add(u)

    for u in ALLOWED:
        visit(u, [])


@pytest.mark.parametrize(
    "unit,line,target",
    [
        ("sampling", "from sftrl_jax.sft import losses", "sft"),
        ("evaluation", "from sftrl_jax.rl import rollout", "rl"),
        ("rl", "from sftrl_jax.sft.train import on_mesh", "sft"),
        ("models", "from sftrl_jax import kernels", "kernels"),
        ("train", "    from sftrl_jax.commands import eval", "commands"),
    ],
)
def test_a_backwards_import_is_caught(tmp_path, unit, line, target):
    """The checker itself: one backwards import in a copy of a unit is reported with its file and line."""
    pkg = tmp_path / "sftrl_jax"
    (pkg / unit).mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / unit / "__init__.py").write_text("")
    body = f"def f():\n{line}\n" if line.startswith(" ") else f"{line}\n"
    (pkg / unit / "bad.py").write_text(body)
    bad = import_violations(pkg)
    assert len(bad) == 1 and f"{unit} -> {target}" in bad[0] and "bad.py:" in bad[0], bad


# ------------------------------------------------------------------------------------------------
# The planner compiles the run's own programs (issue 31): it reaches into no other unit's private
# names (a private sampler function once stood in for the sampler's program), and it does not
# branch on the RL algorithm (the learner the registry names gives its programs).

_ALGO_NAMES = ("ppo", "grpo")


def planner_violations(package: pathlib.Path = PACKAGE) -> list[str]:
    """'file:line: what' for every private name of another module that planning/ uses, and every
    comparison with, or string of, an algorithm's name there."""
    bad = []
    for path in sorted((package / "planning").rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        modules = set()  # local names bound to sftrl_jax modules
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sftrl_jax"):
                for a in node.names:
                    if a.name.startswith("_"):
                        bad.append(f"{path.name}:{node.lineno}: imports the private {node.module}.{a.name}")
                    modules.add(a.asname or a.name)
            elif isinstance(node, ast.Import):
                modules.update((a.asname or a.name).split(".")[0] for a in node.names if a.name.startswith("sftrl_jax"))
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and isinstance(node.value, ast.Name)
                and node.value.id in modules
            ):
                bad.append(f"{path.name}:{node.lineno}: uses the private {node.value.id}.{node.attr}")
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in _ALGO_NAMES:
                bad.append(f"{path.name}:{node.lineno}: branches on the algorithm ({node.value!r})")
    return bad


def test_the_planner_uses_no_private_name_and_no_algorithm_branch():
    bad = planner_violations()
    assert not bad, "planning/ must compile the run's programs through public names:\n" + "\n".join(bad)


@pytest.mark.parametrize(
    "body,what",
    [
        ("from sftrl_jax.sampling import sampler\nf = sampler._prefill\n", "private sampler._prefill"),
        ("from sftrl_jax.sampling.sampler import _decode\n", "private sftrl_jax.sampling.sampler._decode"),
        ("def f(cfg):\n    return cfg.algo == 'ppo'\n", "branches on the algorithm ('ppo')"),
    ],
)
def test_the_planner_check_catches(tmp_path, body, what):
    (tmp_path / "planning").mkdir()
    (tmp_path / "planning" / "bad.py").write_text(body)
    bad = planner_violations(tmp_path)
    assert len(bad) == 1 and what in bad[0], bad
