"""The package's structure: no import cycle, one dispatch table, queries without side effects, and constants
shared between Python and C++ that agree."""

import ast
import re
from pathlib import Path

import pytest
import torch

import lora_kernels as lk
from lora_kernels import _backend, _ext
from lora_kernels.ops import PUBLIC_OPS, SCHEMAS, TABLE, _registry

PKG = Path(lk.__file__).resolve().parent
ROOT = PKG.parent


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _import_graph():
    """Module -> set of lora_kernels modules it imports (module level and inside functions), from the source."""
    files = {_module_name(p): p for p in PKG.rglob("*.py")}
    packages = {m for m, p in files.items() if p.name == "__init__.py"}
    graph = {}
    for mod, path in files.items():
        pkg = mod if mod in packages else mod.rsplit(".", 1)[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    stem = ".".join(base + ([node.module] if node.module else []))
                else:
                    stem = node.module or ""
                targets = [stem] + [f"{stem}.{a.name}" for a in node.names]
            for t in targets:
                if t not in files:
                    continue
                deps.add(t)
                # importing a.b.c runs the __init__ of every enclosing package below the root first (except
                # the packages enclosing the importer itself: those are already being imported)
                parts = t.split(".")
                for i in range(2, len(parts)):
                    parent = ".".join(parts[:i])
                    if parent in packages and not (mod + ".").startswith(parent + "."):
                        deps.add(parent)
        deps.discard(mod)
        deps.discard("lora_kernels")  # the root __init__ imports the public API from everything below it
        graph[mod] = deps
    return graph


def _find_cycle(graph):
    WHITE, GREY, BLACK = 0, 1, 2
    color = {m: WHITE for m in graph}
    stack = []

    def visit(m):
        color[m] = GREY
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if color.get(d) == GREY:
                return stack[stack.index(d):] + [d]
            if color.get(d) == WHITE:
                found = visit(d)
                if found:
                    return found
        stack.pop()
        color[m] = BLACK
        return None

    for m in sorted(graph):
        if color[m] == WHITE:
            found = visit(m)
            if found:
                return found
    return None


def test_no_import_cycle():
    graph = _import_graph()
    assert "lora_kernels.ops.multi_lora" in graph and "lora_kernels._backend" in graph
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_ops_layer_never_imports_the_layers_above_it():
    above = {"lora_kernels.functional", "lora_kernels.modules", "lora_kernels.serving", "lora_kernels.peft",
             "lora_kernels.peft_io", "lora_kernels.exact_merge", "lora_kernels._backend"}
    for mod, deps in _import_graph().items():
        if mod.startswith("lora_kernels.ops"):
            assert not deps & above, f"{mod} imports {sorted(deps & above)}"


def test_every_table_row_is_a_callable_launcher():
    assert TABLE, "the dispatch table is empty"
    for (op, backend), target in TABLE.items():
        assert backend in _backend.BACKENDS, (op, backend)
        if backend == "triton":
            pytest.importorskip("triton")
        fn = _registry.launcher(op, backend)
        assert callable(fn), f"{(op, backend)} -> {target} is not callable"


def test_public_ops_come_from_the_table():
    needed = {p for parts in PUBLIC_OPS.values() for p in parts}
    assert needed == {op for op, _ in TABLE}, "a launcher op that no public op uses, or a public op without rows"
    # the torch backend runs everything; the others list exactly what their rows cover
    assert lk.resolve_backend  # public
    assert _backend.implemented_ops("torch") == sorted(PUBLIC_OPS)
    for be in ("triton", "cuda"):
        want = sorted(n for n, parts in PUBLIC_OPS.items() if all((p, be) in TABLE for p in parts))
        assert _backend.implemented_ops(be) == want


def test_a_new_row_is_seen_by_the_backend(monkeypatch):
    monkeypatch.setitem(_registry.PUBLIC_OPS, "toy_op", ("toy_op",))
    assert "toy_op" not in _backend.implemented_ops("triton")
    assert _backend.why_not("torch", "toy_op", []) == ["torch has no kernel for toy_op"]
    monkeypatch.setitem(_registry.TABLE, ("toy_op", "torch"), "lora_kernels.reference:merge_ref")
    assert "toy_op" in _backend.implemented_ops("torch")
    assert _backend.why_not("torch", "toy_op", []) == []


def test_why_not_is_a_pure_query(monkeypatch):
    from torch._subclasses.fake_tensor import FakeTensorMode

    calls = []
    monkeypatch.setattr(_ext, "load", lambda *a, **k: calls.append(1) or False)
    monkeypatch.setattr(_ext, "_state", dict(loaded=False, tried=False, reason=None))
    with FakeTensorMode():
        ts = [torch.empty(8, 16, device="cuda", dtype=torch.float16), torch.empty(16, 16, device="cuda", dtype=torch.float16)]
        for op in PUBLIC_OPS:
            reasons = _backend.why_not("cuda", op, ts)
            assert any("not loaded" in r for r in reasons), reasons
        assert calls == [], "why_not started a build"
        # choosing the backend is the step that loads it (once, right before the first launch)
        with pytest.raises(lk.BackendUnavailableError, match="not loaded"):
            _backend.resolve_backend("lora_linear", *ts, backend="cuda")
        assert calls == [1]
        # nothing is loaded for inputs the cuda backend cannot take anyway
        calls.clear()
        f64 = [t.double() for t in ts]
        assert _backend.resolve_backend("lora_linear", *f64) == "torch"
        assert calls == []


def test_merge_tile_constants_match_the_cuda_header():
    from lora_kernels.cuda import merge as cuda_merge

    header = (ROOT / "csrc" / "merge.h").read_text()
    n = int(re.search(r"kMergeTileN\s*=\s*(\d+)", header).group(1))
    k = int(re.search(r"kMergeTileK\s*=\s*(\d+)", header).group(1))
    assert (cuda_merge.TILE_N, cuda_merge.TILE_K) == (n, k)


def test_every_schema_has_a_fake():
    from torch._library.simple_registry import singleton

    for name in SCHEMAS:
        assert singleton.find(f"lora_kernels::{name}").fake_impl.kernel is not None, f"{name} has no fake kernel"


def test_import_without_fcntl(monkeypatch):
    """`import lora_kernels` must work where fcntl does not exist (Windows): it is only needed by the JIT build."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['fcntl'] = None\n"
            "import lora_kernels as lk, torch\n"
            "x = torch.randn(3, 4); w = torch.randn(5, 4); a = torch.randn(2, 4); b = torch.randn(5, 2)\n"
            "print(lk.lora_linear(x, w, a, b, 0.5, backend='torch').shape)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "torch.Size([3, 5])" in out.stdout
