"""eval.py --template=lm-eval against lm-evaluation-harness itself, and --export_lmeval task folders run in it.

A tiny model trained for a few steps on the bundled sample is exported with export_hf.py; lm-eval (offline)
scores the export with tasks that include lm-eval's own installed ceval-valid / cmmlu YAML (only the data
path replaced by local files), and eval.py scores the checkpoint. Per option, the log-likelihoods agree to
1e-4 and the accuracies are equal, 0-shot and 2-shot (2-shot contexts exceed the model's 128 tokens, so
left truncation is compared too).

    python -m pytest -q tests/test_eval_lmeval.py
"""
from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest

from conftest import REPO
from test_dataset import write_bin

import eval as ev
import export_hf
import lmeval_tasks
import pretrain
from chatglm_tokenizer import tokenizer_identity

SAMPLE = os.path.join(REPO, "data", "bench_sample")
CMB = os.path.join(REPO, "tests", "fixtures", "bench", "cmb", "CMB-val", "CMB-val-merge.json")
SEQ_LEN = 128
TOLERANCE = 1e-4


# ---------------------------------------------------------------- fixtures: lm-eval, data, a trained model

@pytest.fixture(scope="module", autouse=True)
def offline():
    """Nothing from the Hugging Face hub while these tests run: every dataset and model is a local folder."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_DATASETS_OFFLINE", "1")
        patch.setenv("HF_HUB_OFFLINE", "1")
        yield


@pytest.fixture(scope="module")
def lm_eval(tmp_path_factory):
    """lm-evaluation-harness (a test dependency in requirements.txt; its absence fails CI, skips elsewhere).
    The datasets it builds from the tests' files are cached in a temporary folder, not in ~/.cache."""
    try:
        import datasets
        import lm_eval
        import lm_eval.evaluator   # noqa: F401  (simple_evaluate)
    except ImportError as exc:
        if os.environ.get("MCG_REQUIRE_SHARED") == "1":
            pytest.fail(f"MCG_REQUIRE_SHARED=1 but lm-evaluation-harness is not installed ({exc})")
        pytest.skip(f"lm-evaluation-harness is not installed ({exc}); pip install -r requirements.txt")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("datasets_cache")))
        yield lm_eval


def lmeval_yaml(lm_eval, *parts: str) -> str:
    """A task YAML that lm-eval ships (lm_eval/tasks/...)."""
    return os.path.join(os.path.dirname(lm_eval.__file__), "tasks", *parts)


def write_csv(path, header: list[str], rows: list[list[str]]) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """The bundled sample as lm-eval's ceval task reads it (its dev file without the `explanation` column,
    which a csv data_files set must not add), and as a CMMLU folder of two subjects with their own dev files."""
    root = tmp_path_factory.mktemp("bench")
    val = ev.load_benchmark(f"ceval:{SAMPLE}", shots=5)
    items, dev = val.questions, val.dev["clinical_medicine"]
    ceval = {"val": os.path.join(SAMPLE, "clinical_medicine_val.csv"),
             "dev": write_csv(root / "ceval" / "clinical_medicine_dev.csv", ["id", "question", *"ABCD", "answer"],
                              [[i, q.question, *q.options.values(), q.answer] for i, q in enumerate(dev)])}

    def cmmlu_rows(questions):
        return [[i, q.question, *q.options.values(), q.answer] for i, q in enumerate(questions)]
    header = ["", "Question", *"ABCD", "Answer"]
    cmmlu = {}
    for subject, part, shots in (("anatomy", items[:12], dev[:3]), ("virology", items[12:], dev[2:])):
        cmmlu[subject] = {"test": write_csv(root / "cmmlu" / "test" / f"{subject}.csv", header, cmmlu_rows(part)),
                          "dev": write_csv(root / "cmmlu" / "dev" / f"{subject}.csv", header, cmmlu_rows(shots))}
    return {"root": str(root), "ceval": ceval, "cmmlu": cmmlu}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tokenizer_dir, tokenizer) -> tuple[str, str]:
    """(ckpt.pt, its HF export) of the tiny preset trained 12 steps on the sample's questions and answers."""
    folder = tmp_path_factory.mktemp("trained")
    bench = ev.load_benchmark(f"ceval:{SAMPLE}", shots=5)
    docs = [lmeval_tasks.lmeval_context("ceval", q, []) + " " + q.answer
            for q in bench.questions + bench.dev["clinical_medicine"]]
    tokens = [t for d in docs for t in tokenizer.encode(d) + [2]]
    data = write_bin(str(folder / "train.bin"), tokens, tokenizer_identity(tokenizer_dir))
    pretrain.main([f"--data={data}", f"--out_dir={folder / 'run'}", "--preset=tiny", f"--seq_len={SEQ_LEN}",
                   "--micro_batch_size=4", "--grad_accum_steps=1", "--max_iters=12", "--lr=1e-2", "--min_lr=1e-3",
                   "--warmup_iters=2", "--eval_interval=1000", "--log_interval=100", "--val_data=none"])
    ckpt = str(folder / "run" / "ckpt.pt")
    export_hf.export_hf(ckpt, str(folder / "hf"))
    return ckpt, str(folder / "hf")


def own_task(folder, name: str, include: str, data_files: dict, shots: int) -> None:
    """A task that includes lm-eval's own installed task YAML and replaces only where the data comes from."""
    files = "".join(f"    {split}: {path}\n" for split, path in data_files.items())
    (folder / f"{name}.yaml").write_text(
        f"include: {include}\ntask: {name}\ndataset_path: csv\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n{files}num_fewshot: {shots}\n", encoding="utf-8")


def run_eval(ckpt: str, bench: str, shots: int, out) -> dict:
    assert ev.main([f"--ckpt={ckpt}", f"--bench={bench}", f"--shots={shots}", f"--out={out}"]) == 0
    return json.loads(out.read_text(encoding="utf-8"))


def by_subject(report: dict) -> dict[str, list[dict]]:
    items: dict[str, list[dict]] = {}
    for item in report["items"]:
        items.setdefault(item["subject"], []).append(item)
    return items


def assert_same_scores(ours: list[dict], samples: list[dict], accuracy: float) -> None:
    """eval.py's items against lm-eval's logged samples of one task: every option's log-likelihood, the
    prediction, and the task's accuracy."""
    samples = sorted(samples, key=lambda s: s["doc_id"])
    assert len(samples) == len(ours) > 0
    for mine, sample in zip(ours, samples):
        theirs = [resp[0] for resp in sample["filtered_resps"]]
        assert len(theirs) == len(mine["logprobs"]) and len(set(np.round(theirs, 3))) > 1
        assert np.abs(np.array(theirs) - np.array(mine["logprobs"])).max() < TOLERANCE, mine["where"]
        assert sample["acc"] == float(mine["pred"] == mine["answer"])
    assert accuracy == pytest.approx(sum(i["pred"] == i["answer"] for i in ours) / len(ours), abs=1e-12)


# ---------------------------------------------------------------- the tests

def test_subject_names_are_lm_evals(lm_eval):
    """Every ceval-valid_* and cmmlu_* task description lm-eval ships is the one eval.py writes."""
    import yaml
    for fmt, pattern in (("ceval", "ceval-valid_"), ("cmmlu", "cmmlu_")):
        folder = lmeval_yaml(lm_eval, fmt)
        names = [n for n in os.listdir(folder) if n.startswith(pattern) and n.endswith(".yaml")]
        assert len(names) == {"ceval": 52, "cmmlu": 67}[fmt]
        for name in names:
            config = yaml.safe_load(open(os.path.join(folder, name), encoding="utf-8"))
            assert lmeval_tasks.description(fmt, config["dataset_name"]) == config["description"], name
    # the analogous template (lm-eval has no such tasks): C-Eval's wording, cmb's exam subject, else 医学
    ceval_clinical = lmeval_tasks.description("ceval", "clinical_medicine")
    assert lmeval_tasks.description("cmb", "临床执业医师") == ceval_clinical.replace("临床医学", "临床执业医师")
    assert lmeval_tasks.description("medqa", "medqa") == lmeval_tasks.description("cmexam", "cmexam") == \
        ceval_clinical.replace("临床医学", "医学")


def test_eval_matches_lm_eval_item_for_item(lm_eval, trained, data, tmp_path, capsys, monkeypatch):
    """ceval and cmmlu layouts, 0- and 2-shot: lm-eval's own templates on the export = eval.py on the ckpt.
    Folders written by --export_lmeval (ceval and cmmlu 2-shot, cmb 0-shot) run in the same lm-eval call,
    from another working directory, and agree the same way."""
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    ckpt, hf = trained
    tasks = tmp_path / "own"
    tasks.mkdir()
    ours = {}
    for shots in (0, 2):
        own_task(tasks, f"own_ceval_{shots}", lmeval_yaml(lm_eval, "ceval", "ceval-valid_clinical_medicine.yaml"),
                 data["ceval"], shots)
        for subject, files in data["cmmlu"].items():
            own_task(tasks, f"own_cmmlu_{subject}_{shots}", lmeval_yaml(lm_eval, "cmmlu", f"cmmlu_{subject}.yaml"),
                     files, shots)
        ours[f"ceval_{shots}"] = run_eval(ckpt, f"ceval:{SAMPLE}", shots, tmp_path / f"ceval{shots}.json")
        ours[f"cmmlu_{shots}"] = run_eval(ckpt, f"cmmlu:{data['root']}/cmmlu", shots, tmp_path / f"cmmlu{shots}.json")
        assert ours[f"ceval_{shots}"]["template"] == "lm-eval"                    # the default
    assert ours["ceval_2"]["truncated"] > 0                                       # left truncation is compared
    ours["cmb_0"] = run_eval(ckpt, f"cmb:{CMB}", 0, tmp_path / "cmb.json")
    exports = {"ceval": (f"ceval:{SAMPLE}", 2), "cmmlu": (f"cmmlu:{data['root']}/cmmlu", 2), "cmb": (f"cmb:{CMB}", 0)}
    capsys.readouterr()
    for name, (bench, shots) in exports.items():
        assert ev.main([f"--bench={bench}", f"--shots={shots}", f"--export_lmeval={tmp_path / f'export_{name}'}"]) == 0
    printed = capsys.readouterr().out
    assert f"lm_eval run --model hf --model_args pretrained=out/hf,trust_remote_code=True --tasks export_ceval " \
           f"--include_path {tmp_path / 'export_ceval'}" in printed
    assert sorted(os.listdir(tmp_path / "export_ceval")) == ["_template_yaml", "data", "export_ceval.yaml",
                                                             "export_ceval_clinical_medicine.yaml"]

    lm = HFLM(pretrained=hf, trust_remote_code=True, device="cpu", batch_size=16)
    manager = TaskManager(include_path=[str(tasks), *(str(tmp_path / f"export_{name}") for name in exports)],
                          include_defaults=False)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)   # the exported data_files must not depend on the working directory
    own = sorted(p[:-5] for p in os.listdir(tasks))
    result = lm_eval.simple_evaluate(model=lm, tasks=own + [f"export_{name}" for name in exports],
                                     task_manager=manager, log_samples=True)
    samples, results = result["samples"], result["results"]
    for shots in (0, 2):
        ceval = ours[f"ceval_{shots}"]
        assert_same_scores(ceval["items"], samples[f"own_ceval_{shots}"], results[f"own_ceval_{shots}"]["acc,none"])
        bench = ev.load_benchmark(f"ceval:{SAMPLE}", shots=5)   # the prompt text itself, for the first item
        context = lmeval_tasks.lmeval_context("ceval", bench.questions[0], bench.dev["clinical_medicine"][:shots])
        first = next(s for s in samples[f"own_ceval_{shots}"] if s["doc_id"] == 0)
        assert [tuple(a) for a in first["arguments"]] == [(context, " " + letter) for letter in "ABCD"]
        cmmlu = by_subject(ours[f"cmmlu_{shots}"])
        for subject in ("anatomy", "virology"):
            task = f"own_cmmlu_{subject}_{shots}"
            assert_same_scores(cmmlu[subject], samples[task], results[task]["acc,none"])
    for name, (_, shots) in exports.items():
        report = ours[f"{name}_{shots}"]
        for subject, items in by_subject(report).items():
            task = f"export_{name}_{subject}"
            assert_same_scores(items, samples[task], results[task]["acc,none"])
            assert result["configs"][task]["num_fewshot"] == shots
        assert results[f"export_{name}"]["acc,none"] == pytest.approx(report["scores"][-1]["acc"], abs=1e-12)
    assert len(by_subject(ours["cmb_0"])) == 2 and {len(i["logprobs"]) for i in ours["cmb_0"]["items"]} == {4, 5}


def test_template_flags(tmp_path, capsys):
    """lm-eval is the default for letters in the plain layout; the layouts only the native template has pick
    it by default and refuse --template=lm-eval; --export_lmeval writes lm-eval's template only."""
    assert ev.parse_args(["--bench=ceval:x"]).template == "lm-eval"
    assert ev.parse_args(["--bench=ceval:x", "--layout=sft"]).template == "native"
    assert ev.parse_args(["--bench=ceval:x", "--choice=text"]).template == "native"
    for argv, message in ((["--template=lm-eval", "--layout=sft"], "--layout=sft needs --template=native"),
                          (["--template=lm-eval", "--choice=text"], "--choice=text needs --template=native"),
                          (["--export_lmeval=x", "--template=native"], "writes lm-eval's template"),
                          (["--export_lmeval=x", "--choice=text"], "writes lm-eval's template")):
        with pytest.raises(SystemExit):
            ev.parse_args(["--bench=ceval:x", *argv])
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ev.parse_args(["--export_lmeval=x"])
    assert "--export_lmeval needs --bench" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ev.parse_args(["--bench=ceval:x", "--export_lmeval=x", "--decontam", "--against=y"])
    assert "separate runs" in capsys.readouterr().err
    bench = f"medqa:{REPO}/tests/fixtures/bench/medqa"   # 1 dev item: 2-shot is refused before anything is written
    assert ev.run_main(ev.main, [f"--bench={bench}", "--shots=2", f"--export_lmeval={tmp_path / 'x'}"]) == 1
    assert "--shots=2" in capsys.readouterr().err and not os.listdir(tmp_path)
