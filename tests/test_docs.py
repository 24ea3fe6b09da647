"""The documents against the code: README.md and docs/*.md show only what works.

- Every ``metaformer ...`` command line in a code block (continuation lines, ``torchrun ... -m
  metaformer`` and ``python -m metaformer`` included) parses with the real CLI parser, without running
  it: an unknown command or flag fails. ``python benchmarks/<script>.py`` lines parse with the
  script's own parser.
- Every Python block runs, on random weights, in one namespace per page (in page order, as a reader
  would type them) and in a scratch folder; a block preceded by ``<!-- skip: reason -->`` (it needs a
  download or a data set, or takes minutes) is skipped with that reason.
- Every block between ``<!-- generated: COMMAND -->`` and ``<!-- end generated -->`` is what COMMAND
  prints now. ``python tests/test_docs.py`` rewrites those blocks in place.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import re
import shlex
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\s*$")
SKIP = re.compile(r"^<!-- skip: (.+?) -->$")
GENERATED = re.compile(r"^(<!-- generated: (.+?) -->\n)(.*?)^(<!-- end generated -->)$", re.S | re.M)
SHELLS = {"", "bash", "sh", "shell", "console", "zsh"}
SHELL_OPERATORS = {"&&", "||", ";", "|", "&"}
WRAPPERS = {"time", "/usr/bin/time", "env", "nohup"}


@dataclass(frozen=True)
class Block:
    doc: str
    line: int  # of the opening fence, 1-based
    lang: str
    text: str
    skip: str | None  # the reason, for a block marked <!-- skip: reason -->


def code_blocks(text: str, doc: str) -> list[Block]:
    """The fenced blocks of a Markdown text, with the skip reason written just above each."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        above = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        skip = SKIP.match(above)
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
        if end is None:
            raise AssertionError(f"{doc}:{i + 1}: a code block is never closed")
        body = "\n".join(lines[i + 1 : end]) + "\n"
        blocks.append(Block(doc, i + 1, opening.group(1).lower(), body, skip.group(1) if skip else None))
        i = end + 1
    return blocks


def shell_commands(text: str) -> Iterator[tuple[int, list[str]]]:
    """(line offset, words) of every simple command in a shell block: continuation lines joined,
    comments dropped, ``a && b`` split, leading ``VAR=value`` and ``time`` words removed."""
    logical, start, offset = "", 0, 0
    for offset, line in enumerate(text.splitlines()):
        if not logical:
            start = offset
        if line.rstrip().endswith("\\"):
            logical += line.rstrip()[:-1] + " "
            continue
        logical += line
        lexer = shlex.shlex(logical.removeprefix("$ "), posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        lexer.commenters = "#"
        try:
            words, logical = list(lexer), ""
        except ValueError as caught:  # an unbalanced quote
            raise AssertionError(f"line {start + 1} of the block: {caught}: {logical!r}") from caught
        command: list[str] = []
        for word in [*words, ";"]:
            if word not in SHELL_OPERATORS:
                command.append(word)
                continue
            while command and (re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", command[0]) or command[0] in WRAPPERS):
                command.pop(0)
            if command:
                yield start, command
            command = []


def cli_argv(words: list[str]) -> list[str] | None:
    """The arguments metaformer's CLI gets from a command line, or None when it does not run metaformer."""
    if words[0] == "metaformer":
        return words[1:]
    if words[0] in ("python", "python3", "torchrun") and "-m" in words:
        at = words.index("-m")
        if words[at + 1 : at + 2] == ["metaformer"]:
            return words[at + 2 :]
    return None


def _parse_metaformer(argv: list[str]) -> str | None:
    from metaformer import cli

    return _parse(cli.build_parser().parse_args, argv)


def _benchmark_parser(script: str):  # noqa: ANN202 - the script's own parse_args, if it has one
    """A benchmark script's ``parse_args(argv)``; for a script without one, a parser that only checks
    that the script exists."""
    path = ROOT / script
    if not path.is_file():
        return lambda argv: sys.exit(f"{script}: no such script")
    if "def parse_args(" not in path.read_text(encoding="utf-8"):
        return lambda argv: None
    spec = importlib.util.spec_from_file_location(f"_doc_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.parse_args


def _parse(parse, argv: list[str]) -> str | None:  # noqa: ANN001
    """None when ``argv`` parses, else what the parser said."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            parse(argv)
    except SystemExit as caught:
        if caught.code not in (0, None):
            return err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else str(caught.code)
    return None


def check_commands(docs: dict[str, str]) -> tuple[int, list[str]]:
    """How many command lines parsed, and one line per command that did not."""
    parsed, failures, benchmark_parsers = 0, [], {}
    for doc, text in docs.items():
        for block in code_blocks(text, doc):
            if block.lang in ("python", "py"):
                continue
            text = block.text
            if block.lang not in SHELLS:  # output, a tree: only the lines that are metaformer commands
                text = "\n".join(
                    line if re.match(r"^(\$ )?metaformer ", line) else "" for line in text.splitlines()
                )
            for offset, words in shell_commands(text):
                where = f"{doc}:{block.line + 1 + offset}"
                argv = cli_argv(words)
                if argv is not None:
                    problem = _parse_metaformer(argv)
                elif (
                    words[0] in ("python", "python3")
                    and len(words) > 1
                    and words[1].startswith("benchmarks/")
                ):
                    if words[1] not in benchmark_parsers:
                        benchmark_parsers[words[1]] = _benchmark_parser(words[1])
                    problem = _parse(benchmark_parsers[words[1]], words[2:])
                else:
                    continue
                parsed += 1
                if problem:
                    failures.append(f"{where}: `{shlex.join(words)}`: {problem}")
    return parsed, failures


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _name(path: Path) -> str:
    return str(path.relative_to(ROOT))


# --------------------------------------------------------------------------- commands
def test_every_command_line_in_the_documents_parses(capsys: pytest.CaptureFixture[str]) -> None:
    parsed, failures = check_commands({_name(p): _read(p) for p in DOCS})
    with capsys.disabled():
        print(f"\ndocuments: {parsed} command lines parsed against the CLI and benchmark parsers")
    assert not failures, "command lines that do not parse:\n" + "\n".join(failures)
    assert parsed >= 40, f"only {parsed} command lines found: is the block scanner broken?"


def test_a_bogus_flag_or_command_in_a_document_fails() -> None:
    readme = _read(ROOT / "README.md")
    assert "metaformer classify train --model poolformer_s12" in readme
    for bogus in ("metaformer classify train --bogus-flag --model", "metaformer classyfy train --model"):
        scratch = readme.replace("metaformer classify train --model", bogus, 1)
        parsed, failures = check_commands({"README.md (scratch copy)": scratch})
        assert len(failures) == 1 and ("bogus" in failures[0] or "classyfy" in failures[0]), failures
    block = "```bash\npython benchmarks/inference.py --bogus\npython benchmarks/no_such.py\n```\n"
    parsed, failures = check_commands({"scratch.md": block})
    assert parsed == 2 and "--bogus" in failures[0] and "no such script" in failures[1], failures


def test_the_block_scanner_reads_continuations_wrappers_and_chains() -> None:
    text = (
        "```bash\n"
        "MKL_ENABLE_INSTRUCTIONS=AVX2 /usr/bin/time metaformer info --system  # a comment\n"
        "torchrun --nnodes=2 --rdzv_id=x -m metaformer classify train \\\n"
        "  --data d --output o\n"
        "pip install -e . && python -m metaformer models 'poolformer_*'\n"
        "python -m pytest tests\n"
        "```\n"
    )
    found = [cli_argv(words) for _, words in shell_commands(code_blocks(text, "t")[0].text)]
    assert [argv for argv in found if argv is not None] == [
        ["info", "--system"],
        ["classify", "train", "--data", "d", "--output", "o"],
        ["models", "poolformer_*"],
    ]


# --------------------------------------------------------------------------- links
def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", _read(path), flags=re.S | re.M)  # no headings inside code
    return {_anchor(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, re.M)}


def test_every_link_between_the_documents_resolves() -> None:
    broken = []
    for path in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", _read(path)):
            if re.match(r"^[a-z]+://", target):
                continue
            file, _, anchor = target.partition("#")
            linked = (path.parent / file).resolve() if file else path
            if not linked.exists():
                broken.append(f"{_name(path)}: {target} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
                broken.append(f"{_name(path)}: {target} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)


# --------------------------------------------------------------------------- Python examples
@contextlib.contextmanager
def _page_sandbox(folder: Path) -> Iterator[None]:
    """A scratch working folder, and the registries a page may add to put back as they were."""
    from metaformer.models import mixers

    registered, cwd = dict(mixers.MIXERS), Path.cwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(cwd)
        mixers.MIXERS.clear()
        mixers.MIXERS.update(registered)


@pytest.mark.parametrize("path", DOCS, ids=_name)
def test_python_examples_run(
    path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("METAFORMER_HOME", str(tmp_path / "home"))
    blocks = [b for b in code_blocks(_read(path), _name(path)) if b.lang in ("python", "py")]
    namespace: dict[str, object] = {"__name__": "__doc_example__"}
    ran, skipped, threads = 0, [], torch.get_num_threads()
    torch.set_num_threads(min(2, threads))
    with _page_sandbox(tmp_path):
        for block in blocks:
            if block.skip:
                skipped.append(f"{block.doc}:{block.line} ({block.skip})")
                continue
            try:
                with contextlib.redirect_stdout(io.StringIO()):
                    exec(compile(block.text, f"{block.doc}:{block.line}", "exec"), namespace)  # noqa: S102
            except Exception as caught:  # noqa: BLE001 - report which block, then fail
                raise AssertionError(f"{block.doc}:{block.line}: the example fails: {caught!r}") from caught
            ran += 1
    torch.set_num_threads(threads)
    with capsys.disabled():
        print(f"\n{_name(path)}: {ran} Python examples ran, {len(skipped)} skipped")
        for reason in skipped:
            print(f"  skipped {reason}")


def test_every_skipped_example_gives_a_reason() -> None:
    for path in DOCS:
        for number, line in enumerate(_read(path).splitlines(), 1):
            if line.startswith("<!-- skip"):
                assert SKIP.match(line.strip()), f"{_name(path)}:{number}: write <!-- skip: reason -->"


# --------------------------------------------------------------------------- generated tables
@contextlib.contextmanager
def _tables_without_weights(fast: bool) -> Iterator[None]:
    """Models built without drawing random weights: the tables count parameters and multiply-adds,
    which the values never change, and drawing 1.3 G random numbers for 33 models is most of what
    ``metaformer models`` costs. Route probes are off, so the op counter sees one forward.

    ``fast``: the models are built and run on the meta device (shapes only, no arithmetic), with
    scaled_dot_product_attention as opaque to the op counter as PyTorch's fused CPU kernel is
    (``count_macs`` adds its products from a hook), and the norms, which the counter never counts
    (hooks on the norm modules do), answered by shape instead of by their slow meta decompositions.
    ``test_the_fast_count_is_the_cpu_count`` holds it to the CPU count; the refresh (``python
    tests/test_docs.py``) runs on the CPU."""
    import torch.nn.functional as F

    from metaformer import report

    real_create = report.create_model
    real_ops = {
        name: getattr(F, name) for name in ("scaled_dot_product_attention", "group_norm", "layer_norm")
    }

    def on_meta(name: str, **kwargs: object) -> torch.nn.Module:
        with torch.device("meta"):
            return real_create(name, **kwargs)

    def zeroed(name: str, **kwargs: object) -> torch.nn.Module:
        model = on_meta(name, **kwargs).to_empty(device="cpu")
        for tensor in (*model.parameters(), *model.buffers()):
            if tensor.is_floating_point():
                tensor.data.zero_()
        return model

    def opaque_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args: object, **kw: object):  # noqa: ANN202
        return q.new_empty((*q.shape[:-1], v.shape[-1]))

    def opaque_norm(x: torch.Tensor, *args: object, **kw: object) -> torch.Tensor:
        return x.new_empty(x.shape)

    previous = os.environ.get("METAFORMER_ROUTE_PROBE")
    os.environ["METAFORMER_ROUTE_PROBE"] = "0"
    report.create_model = on_meta if fast else zeroed
    stored, report.MODEL_COUNTS = report.MODEL_COUNTS, {}  # count now, not from the stored table
    if fast:
        F.scaled_dot_product_attention, F.group_norm, F.layer_norm = opaque_sdpa, opaque_norm, opaque_norm
    try:
        yield
    finally:
        report.create_model = real_create
        report.MODEL_COUNTS = stored
        for name, op in real_ops.items():
            setattr(F, name, op)
        if previous is None:
            os.environ.pop("METAFORMER_ROUTE_PROBE")
        else:
            os.environ["METAFORMER_ROUTE_PROBE"] = previous


def render(command: str, *, fast: bool = True) -> str:
    """What ``command`` (a ``metaformer ...`` line) prints, as it stands in a document: a Markdown
    table as is, anything else in a text block. ``fast`` applies to ``metaformer models`` only (the
    other commands run a real forward pass on CPU tensors)."""
    from metaformer import cli

    argv = shlex.split(command)[1:]
    out = io.StringIO()
    with _tables_without_weights(fast and argv[:1] == ["models"]), contextlib.redirect_stdout(out):
        code = cli.main(argv)
    assert code == 0, f"`{command}` exited with {code}"
    text = out.getvalue()
    return text if text.startswith("|") else f"```text\n{text}```\n"


def generated_blocks(text: str) -> list[tuple[str, str]]:
    return [(m.group(2), m.group(3)) for m in GENERATED.finditer(text)]


def refresh(paths: list[Path] = DOCS) -> list[str]:
    """Rewrite every generated block in place; the names of the files that changed."""
    changed = []
    for path in paths:
        text = _read(path)
        new = GENERATED.sub(lambda m: m.group(1) + render(m.group(2), fast=False) + m.group(4), text)
        if new != text:
            path.write_text(new, encoding="utf-8")
            changed.append(_name(path))
    return changed


GENERATED_BLOCKS = [(p, cmd) for p in DOCS for cmd, _ in generated_blocks(_read(p))]


@pytest.mark.parametrize(
    ("path", "command"), GENERATED_BLOCKS, ids=[f"{_name(p)}:{c}" for p, c in GENERATED_BLOCKS]
)
def test_generated_tables_are_current(path: Path, command: str) -> None:
    if not command.startswith("metaformer "):
        pytest.fail(f"{_name(path)}: a generated block names `{command}`, not a metaformer command")
    stored = dict(generated_blocks(_read(path)))[command]
    assert stored == render(command), (
        f"{_name(path)}: the block generated by `{command}` is stale; run `python tests/test_docs.py`"
    )


def test_the_model_table_is_generated_and_counts_every_model() -> None:
    from metaformer.models import list_models

    commands = [cmd for _, cmd in GENERATED_BLOCKS]
    assert "metaformer models --markdown" in commands
    table = dict(generated_blocks(_read(ROOT / "docs" / "models.md")))["metaformer models --markdown"]
    assert len(table.strip().splitlines()) == 2 + len(list_models())


def test_the_fast_count_is_the_cpu_count() -> None:
    """The meta-device table equals the CPU one for an attention hybrid and a random-mixing model (the
    two mixers whose products the op counter could see differently)."""
    command = "metaformer models --markdown metaformer_ppaa_s12_224"
    assert render(command) == render(command, fast=False)
    assert render("metaformer models --markdown randformer_s12") == render(
        "metaformer models --markdown randformer_s12", fast=False
    )


# --------------------------------------------------------------------------- examples that need a download
def _marked_block(doc: str, needle: str) -> Block:
    """The one Python block of ``doc`` containing ``needle``; it must be marked skip (a download or a
    trained checkpoint), so that the reader is told why the page's own run leaves it out."""
    path = ROOT / doc
    (block,) = [b for b in code_blocks(_read(path), doc) if b.lang == "python" and needle in b.text]
    assert block.skip, f"{doc}:{block.line}: mark the example <!-- skip: reason -->"
    return block


def _run_block(block: Block) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(block.text, f"{block.doc}:{block.line}", "exec"), {"__name__": "__doc_example__"})  # noqa: S102
    return out.getvalue()


def test_the_faster_rcnn_example_runs_on_a_local_copy_of_the_release(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """dense.md's FasterRCNN example, as written, with poolformer_s12's record pointing at a file:// copy."""
    import dataclasses

    from metaformer import create_model
    from metaformer.weights import PRETRAINED, to_official_keys

    release = tmp_path / "poolformer_s12.pth.tar"
    torch.save(to_official_keys(create_model("poolformer_s12").state_dict()), release)
    record = dataclasses.replace(PRETRAINED["poolformer_s12.sail_in1k"], url=release.as_uri(), sha256=None)
    monkeypatch.setitem(PRETRAINED, record.tag, record)
    monkeypatch.setenv("METAFORMER_HOME", str(tmp_path / "home"))
    out = _run_block(_marked_block("docs/dense.md", "FasterRCNN("))
    assert out.splitlines() == [
        "[(64, 4), (128, 8), (320, 16), (512, 32)]",
        "256",
        "['boxes', 'labels', 'scores']",
    ]


def test_the_predict_in_python_example_runs_on_a_trained_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """README's predict-in-Python example, as written, in a folder holding a tiny run and an image."""
    from PIL import Image

    from metaformer.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("METAFORMER_HOME", str(tmp_path / "home"))
    tiny = '{"depths": [1, 1, 1, 1], "dims": [8, 16, 32, 64]}'
    argv = ["classify", "train", "--output", "runs/s12", "--model-kwargs", tiny, "--epochs", "1"]
    assert main([*argv, "--limit-train", "32", "--limit-val", "16", "--batch-size", "16"]) == 0
    Image.new("RGB", (60, 40), (200, 30, 30)).save("cat.jpg")
    out = _run_block(_marked_block("README.md", "model_from_weights("))
    name, probability = out.split()
    assert name in [str(d) for d in range(10)] and probability.endswith("%")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    done = refresh()
    print("refreshed: " + (", ".join(done) if done else "nothing (every generated block is current)"))
