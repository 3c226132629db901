"""Local lm-evaluation-harness tasks built from the running interpreter's standard library.

Why: no benchmark can be downloaded on the machines datasteer is tested on, yet downstream accuracy needs a task
with real text and a known answer. Python's own sources are on every such machine; `realtext_task.stdlib_functions`
already mines them (ast only: no import, no network). `build(folder, seed)` writes two harness tasks:

- `stdlib_module` (multiple choice, log-likelihood): a public top-level function's signature and docstring line,
  "Which standard library module defines it?", four real module names (the answer and three distractors that
  define no function of that name). Metrics `acc` and `acc_norm` (chance: 0.25).
- `stdlib_docline` (generation, greedy): a signature and the first half of its docstring's first line; the model
  completes the line. Metrics `exact_match` and `word_prefix` (`downstream_task_utils.py`, copied beside the YAML).

Each task folder holds `<task>.yaml`, `test.jsonl` (the scored documents) and `train.jsonl` (few-shot examples
only, other functions than the test ones). Rows carry `module` and `name`, so a benchmark can keep its training
pool and selection targets disjoint from them; `exclude` keeps given (module, name) pairs out of both tasks.
Everything is a pure function of (interpreter, seed). Point `downstream.include_path` at `folder`:

    python bench/downstream_tasks.py .cache/downstream_tasks    # writes both tasks, prints the counts

The builder lives in bench/ beside the miner it reuses: the tasks are a reproducible benchmark fixture, not a
feature of the package; users name their own task YAMLs (or the harness's, e.g. `mmlu`) in `downstream.tasks`.
"""

from __future__ import annotations

import json
import random
import shutil
import sys
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script or loaded by path from the tests

from realtext_task import Function, stdlib_functions

TASKS: tuple[str, ...] = ("stdlib_module", "stdlib_docline")
CHOICES = 4
UTILS = Path(__file__).resolve().parent / "downstream_task_utils.py"


def _public(fn: Function) -> bool:
    """A top-level function of a public module: `_pyio.open` or a method answers 'which module' ambiguously."""
    return not fn.args.startswith(("(self", "(cls")) and not any(p.startswith("_") for p in fn.module.split("."))


def module_rows(functions: list[Function], pool: list[Function], rng: random.Random) -> list[dict]:
    """One multiple-choice row per function; distractors are modules of `pool` that define no function of its name."""
    modules = sorted({f.module for f in pool})
    defines: dict[str, set[str]] = defaultdict(set)
    for f in stdlib_functions():
        defines[f.name].add(f.module)
    rows = []
    for fn in functions:
        wrong = rng.sample([m for m in modules if m not in defines[fn.name]], CHOICES - 1)
        choices = [fn.module, *wrong]
        rng.shuffle(choices)
        prompt = f'Python function: {fn.name}{fn.args}\n"{fn.doc}"\nWhich standard library module defines it?\nAnswer:'
        rows.append(
            {
                "prompt": prompt,
                "choices": choices,
                "answer": choices.index(fn.module),
                "module": fn.module,
                "name": fn.name,
            }
        )
    return rows


def docline_rows(functions: list[Function]) -> list[dict]:
    """One completion row per function: the first half of the docstring line is given, the rest is the target."""
    rows = []
    for fn in functions:
        words = fn.doc.split()
        head = max(2, len(words) // 2)
        prompt = f'def {fn.name}{fn.args}:\n    """{" ".join(words[:head])}'
        rows.append({"prompt": prompt, "target": " ".join(words[head:]), "module": fn.module, "name": fn.name})
    return rows


def task_yaml(name: str, folder: Path) -> dict:
    """The harness config of one task; data paths are absolute, so the folder can be named from anywhere."""
    data = {"train": str(folder / "train.jsonl"), "test": str(folder / "test.jsonl")}
    common = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": data},
        "test_split": "test",
        "fewshot_split": "train",
        "fewshot_config": {"sampler": "first_n"},
        "doc_to_text": "prompt",
        "metadata": {"version": 1.0},
    }
    if name == "stdlib_module":
        metrics = [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", "acc_norm")]
        return {**common, "output_type": "multiple_choice", "doc_to_choice": "choices", "doc_to_target": "answer",
                "metric_list": metrics}  # fmt: skip
    metrics = [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("exact_match", "word_prefix")]
    generation = {"until": ["\n", '"""'], "do_sample": False, "max_gen_toks": 24}
    return {**common, "output_type": "generate_until", "doc_to_target": "target", "generation_kwargs": generation,
            "metric_list": metrics}  # fmt: skip


def _write_task(folder: Path, name: str, test: list[dict], train: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in (("test", test), ("train", train)):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = yaml.safe_dump(task_yaml(name, folder.resolve()), sort_keys=False)
    if name == "stdlib_docline":  # a YAML tag the harness resolves against this folder; safe_dump cannot write it
        shutil.copyfile(UTILS, folder / "utils.py")
        text += "process_results: !function utils.process_results\n"
    (folder / f"{name}.yaml").write_text(text)


def build(
    folder: str | Path, seed: int = 0, docs: int = 300, fewshot_docs: int = 16, exclude: Iterable[tuple[str, str]] = ()
) -> dict[str, int]:
    """Write both tasks under `folder` (one subfolder each) and return their document counts.

    Functions are shuffled by `seed`; each task's test documents and few-shot examples are disjoint slices.
    `exclude` holds (module, name) pairs a benchmark trains or selects on: they are in neither task.
    """
    skip = set(exclude)
    functions = [f for f in stdlib_functions() if (f.module, f.name) not in skip]
    rng = random.Random(f"downstream:{seed}")
    public = [f for f in functions if _public(f)]
    completable = [f for f in functions if len(f.doc.split()) >= 4]
    counts = {}
    for name, candidates in (("stdlib_module", public), ("stdlib_docline", completable)):
        order = candidates[:]
        random.Random(f"downstream:{seed}:{name}").shuffle(order)
        if len(order) < docs + fewshot_docs:
            raise ValueError(f"{name}: the stdlib gave {len(order)} functions; need {docs + fewshot_docs}")
        test, train = order[:docs], order[docs : docs + fewshot_docs]
        if name == "stdlib_module":
            _write_task(Path(folder) / name, name, module_rows(test, public, rng), module_rows(train, public, rng))
        else:
            _write_task(Path(folder) / name, name, docline_rows(test), docline_rows(train))
        counts[name] = len(test)
    return counts


if __name__ == "__main__":
    print(json.dumps(build(sys.argv[1] if len(sys.argv) > 1 else ".cache/downstream_tasks")))
