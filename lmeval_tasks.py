"""Benchmark prompts exactly as lm-evaluation-harness builds them, and benchmarks written as lm-eval task folders.

    from lmeval_tasks import lmeval_context, write_task_folder
    text = lmeval_context("ceval", question, shots)      # the context; each option scores " " + its letter
    write_task_folder("out/lmeval_ceval", "ceval", "val", questions, dev, shots=5)
    lm_eval run --model hf --model_args pretrained=out/hf,trust_remote_code=True \
        --tasks lmeval_ceval --include_path out/lmeval_ceval

lm-eval 0.4's `ceval-valid_*` and `cmmlu_*` tasks (lm_eval/tasks/ceval, lm_eval/tasks/cmmlu) build a context as
    description + (doc_to_text(shot) + " " + its letter + "\\n\\n" for the first k dev items) + doc_to_text(item)
with doc_to_text = "{question.strip()}\\nA. {A}\\nB. {B}\\nC. {C}\\nD. {D}\\n答案：", and score each option as the
continuation " " + letter (target delimiter " "); the description names the subject:
    ceval  以下是中国关于{科目}的单项选择题，请选出其中的正确答案。\\n\\n
    cmmlu  以下是关于{科目}的单项选择题，请直接给出正确答案的选项。\\n\\n
lm-eval ships no task for cmb, cmexam or medqa; they get C-Eval's template with the item's own options (A–E)
and, as subject, cmb's exam_subject, or 医学 (cmexam, medqa). Nothing precedes the description (no BOS:
lm-eval adds only what the tokenizer's encode adds, and ours adds nothing).

A task folder holds one task per subject (`GROUP_SUBJECT.yaml`, all including `_template_yaml`), a group
`GROUP.yaml` (GROUP = the folder's name) averaging over all items as eval.py's "overall" does, and the items as
JSON Lines under data/, named in the YAML by absolute path (lm-eval reads data_files relative to the working
directory, not to the YAML): move the folder and export it again.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from typing import Iterable, Protocol

from corpus_io import replace_folder

TARGET_DELIMITER = " "
FEWSHOT_DELIMITER = "\n\n"
# lm-eval's subject names (lm_eval/tasks/{ceval,cmmlu}/_generate_configs.py), as its task descriptions use them
CEVAL_NAMES = {
    "accountant": "注册会计师", "advanced_mathematics": "高等数学", "art_studies": "艺术学", "basic_medicine": "基础医学",
    "business_administration": "工商管理", "chinese_language_and_literature": "中国语言文学", "civil_servant": "公务员",
    "clinical_medicine": "临床医学", "college_chemistry": "大学化学", "college_economics": "大学经济学",
    "college_physics": "大学物理", "college_programming": "大学编程", "computer_architecture": "计算机组成",
    "computer_network": "计算机网络", "discrete_mathematics": "离散数学", "education_science": "教育学",
    "electrical_engineer": "注册电气工程师", "environmental_impact_assessment_engineer": "环境影响评价工程师",
    "fire_engineer": "注册消防工程师", "high_school_biology": "高中生物", "high_school_chemistry": "高中化学",
    "high_school_chinese": "高中语文", "high_school_geography": "高中地理", "high_school_history": "高中历史",
    "high_school_mathematics": "高中数学", "high_school_physics": "高中物理", "high_school_politics": "高中政治",
    "ideological_and_moral_cultivation": "思想道德修养与法律基础", "law": "法学", "legal_professional": "法律职业资格",
    "logic": "逻辑学", "mao_zedong_thought": "毛泽东思想和中国特色社会主义理论体系概论", "marxism": "马克思主义基本原理",
    "metrology_engineer": "注册计量师", "middle_school_biology": "初中生物", "middle_school_chemistry": "初中化学",
    "middle_school_geography": "初中地理", "middle_school_history": "初中历史", "middle_school_mathematics": "初中数学",
    "middle_school_physics": "初中物理", "middle_school_politics": "初中政治", "modern_chinese_history": "近代史纲要",
    "operating_system": "操作系统", "physician": "医师资格", "plant_protection": "植物保护",
    "probability_and_statistics": "概率统计", "professional_tour_guide": "导游资格", "sports_science": "体育学",
    "tax_accountant": "税务师", "teacher_qualification": "教师资格", "urban_and_rural_planner": "注册城乡规划师",
    "veterinary_medicine": "兽医学",
}
CMMLU_NAMES = {
    "agronomy": "农学", "anatomy": "解剖学", "ancient_chinese": "古汉语", "arts": "艺术学", "astronomy": "天文学",
    "business_ethics": "商业伦理", "chinese_civil_service_exam": "中国公务员考试", "chinese_driving_rule": "中国驾驶规则",
    "chinese_food_culture": "中国饮食文化", "chinese_foreign_policy": "中国外交政策", "chinese_history": "中国历史",
    "chinese_literature": "中国文学", "chinese_teacher_qualification": "中国教师资格", "clinical_knowledge": "临床知识",
    "college_actuarial_science": "大学精算学", "college_education": "大学教育学", "college_engineering_hydrology": "大学工程水文学",
    "college_law": "大学法律", "college_mathematics": "大学数学", "college_medical_statistics": "大学医学统计",
    "college_medicine": "大学医学", "computer_science": "计算机科学", "computer_security": "计算机安全",
    "conceptual_physics": "概念物理学", "construction_project_management": "建设工程管理", "economics": "经济学",
    "education": "教育学", "electrical_engineering": "电气工程", "elementary_chinese": "小学语文",
    "elementary_commonsense": "小学常识", "elementary_information_and_technology": "小学信息技术",
    "elementary_mathematics": "初等数学", "ethnology": "民族学", "food_science": "食品科学", "genetics": "遗传学",
    "global_facts": "全球事实", "high_school_biology": "高中生物", "high_school_chemistry": "高中化学",
    "high_school_geography": "高中地理", "high_school_mathematics": "高中数学", "high_school_physics": "高中物理学",
    "high_school_politics": "高中政治", "human_sexuality": "人类性行为", "international_law": "国际法学", "journalism": "新闻学",
    "jurisprudence": "法理学", "legal_and_moral_basis": "法律与道德基础", "logical": "逻辑学", "machine_learning": "机器学习",
    "management": "管理学", "marketing": "市场营销", "marxist_theory": "马克思主义理论", "modern_chinese": "现代汉语",
    "nutrition": "营养学", "philosophy": "哲学", "professional_accounting": "专业会计", "professional_law": "专业法学",
    "professional_medicine": "专业医学", "professional_psychology": "专业心理学", "public_relations": "公共关系",
    "security_study": "安全研究", "sociology": "社会学", "sports_science": "体育学", "traditional_chinese_medicine": "中医中药",
    "virology": "病毒学", "world_history": "世界历史", "world_religions": "世界宗教",
}
OTHER_SUBJECT = "医学"   # cmexam and medqa items carry no subject; cmb items without exam_subject neither


class Item(Protocol):
    """What a prompt needs of eval.Question."""
    subject: str
    question: str
    options: dict[str, str]
    answer: str
    where: str


# ---------------------------------------------------------------- prompts

def description(fmt: str, subject: str) -> str:
    """The task description that starts every context: lm-eval's for ceval and cmmlu, C-Eval's for the rest."""
    if fmt == "cmmlu":
        return f"以下是关于{CMMLU_NAMES.get(subject, subject)}的单项选择题，请直接给出正确答案的选项。\n\n"
    if fmt == "ceval":
        name = CEVAL_NAMES.get(subject, subject)
    else:
        name = OTHER_SUBJECT if subject == fmt else subject
    return f"以下是中国关于{name}的单项选择题，请选出其中的正确答案。\n\n"


def doc_to_text(item: Item) -> str:
    """lm-eval's doc_to_text: the question, one "X. option" line per option, then 答案："""
    return item.question.strip() + "\n" + "".join(f"{k}. {v}\n" for k, v in item.options.items()) + "答案："


def lmeval_context(fmt: str, item: Item, shots: Iterable[Item]) -> str:
    """The context lm-eval scores every option of `item` after (shots: the first k dev items, first_n)."""
    solved = "".join(doc_to_text(s) + TARGET_DELIMITER + s.answer + FEWSHOT_DELIMITER for s in shots)
    return description(fmt, item.subject) + solved + doc_to_text(item)


def lmeval_continuation(letter: str) -> str:
    return TARGET_DELIMITER + letter


# ---------------------------------------------------------------- lm-eval task folders

LETTERS_4 = ["A", "B", "C", "D"]
TEMPLATES = {   # doc_to_text, doc_to_choice, doc_to_target: ceval's and cmmlu's verbatim from lm-eval
    "ceval": ("{{question.strip()}}\nA. {{A}}\nB. {{B}}\nC. {{C}}\nD. {{D}}\n答案：", LETTERS_4,
              "{{['A', 'B', 'C', 'D'].index(answer)}}"),
    "cmmlu": ("{{Question.strip()}}\nA. {{A}}\nB. {{B}}\nC. {{C}}\nD. {{D}}\n答案：", LETTERS_4,
              "{{['A', 'B', 'C', 'D'].index(Answer)}}"),
    "other": ("{{question.strip()}}\n{% for letter in choices %}{{letter}}. {{options[loop.index0]}}\n{% endfor %}答案：",
              "choices", "{{choices.index(answer)}}"),
}
METRICS = [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", "acc_norm")]


def task_row(fmt: str, item: Item) -> dict:
    """One item in the field names its template reads (ceval's and cmmlu's: those of their CSV files)."""
    if fmt == "ceval":
        return {"question": item.question, **item.options, "answer": item.answer, "where": item.where}
    if fmt == "cmmlu":
        return {"Question": item.question, **item.options, "Answer": item.answer, "where": item.where}
    return {"question": item.question, "choices": list(item.options), "options": list(item.options.values()),
            "answer": item.answer, "where": item.where}


def _name(text: str) -> str:
    """A subject or folder name as lm-eval task names and file names allow."""
    return re.sub(r"[^\w\-]+", "_", text).strip("_") or "task"


def _yaml(config: dict) -> str:
    """YAML of a flat dict, each value written as JSON (JSON values are YAML flow values)."""
    return "".join(f"{key}: {json.dumps(value, ensure_ascii=False)}\n" for key, value in config.items())


def _jsonl(path: str, rows: Iterable[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def _template_config(fmt: str, shots: int) -> dict:
    text, choice, target = TEMPLATES[fmt if fmt in ("ceval", "cmmlu") else "other"]
    return {"dataset_path": "json", "output_type": "multiple_choice", "doc_to_text": text, "doc_to_choice": choice,
            "doc_to_target": target, "target_delimiter": TARGET_DELIMITER, "fewshot_delimiter": FEWSHOT_DELIMITER,
            "fewshot_config": {"sampler": "first_n"}, "num_fewshot": shots, "metric_list": METRICS,
            "metadata": {"version": 1.0}}


def shot_pool(dev: dict[str, list[Item]], subject: str, shots: int) -> list[Item]:
    """The dev items a subject's task draws its first k shots from: its own when it has enough, else all of
    them (what eval.py's shots_for picks)."""
    own = dev.get(subject, [])
    return own if own and len(own) >= shots else [q for items in dev.values() for q in items]


def _subject_task(fmt: str, group: str, subject: str, split: str, items: list[Item], pool: list[Item],
                  data_dir: str, tmp_data: str) -> dict:
    """Write a subject's data files into tmp_data; its task config names them where they will be (data_dir)."""
    stem = _name(subject)
    _jsonl(os.path.join(tmp_data, f"{stem}_{split}.jsonl"), (task_row(fmt, q) for q in items))
    files = {split: os.path.join(data_dir, f"{stem}_{split}.jsonl")}
    config = {"include": "_template_yaml", "task": f"{group}_{stem}", "description": description(fmt, subject),
              "test_split": split}
    if pool and split != "dev":
        _jsonl(os.path.join(tmp_data, f"{stem}_dev.jsonl"), (task_row(fmt, q) for q in pool))
        files["dev"] = os.path.join(data_dir, f"{stem}_dev.jsonl")
    if pool:
        config["fewshot_split"] = "dev"
    config["dataset_kwargs"] = {"data_files": files}
    return config


def write_task_folder(folder: str, fmt: str, split: str, items: list[Item], dev: dict[str, list[Item]],
                      shots: int) -> tuple[str, list[str]]:
    """Write an lm-eval task folder for `items` (one task per subject, a group over them) at `folder`, replacing
    what is there; returns (group name, task names). k-shot examples come from `dev` as shot_pool says."""
    folder = os.path.abspath(folder)
    group = _name(os.path.basename(folder))
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{group}.tmp-", dir=os.path.dirname(folder))
    try:
        os.mkdir(os.path.join(tmp, "data"))
        tasks = []
        for subject in sorted({q.subject for q in items}):
            config = _subject_task(fmt, group, subject, split, [q for q in items if q.subject == subject],
                                   shot_pool(dev, subject, shots), os.path.join(folder, "data"),
                                   os.path.join(tmp, "data"))
            with open(os.path.join(tmp, f"{config['task']}.yaml"), "w", encoding="utf-8") as f:
                f.write(_yaml(config))
            tasks.append(config["task"])
        with open(os.path.join(tmp, "_template_yaml"), "w", encoding="utf-8") as f:
            f.write(_yaml(_template_config(fmt, shots)))
        aggregate = [{"metric": m, "aggregation": "mean", "weight_by_size": True} for m in ("acc", "acc_norm")]
        with open(os.path.join(tmp, f"{group}.yaml"), "w", encoding="utf-8") as f:
            f.write(_yaml({"group": group, "task": tasks, "aggregate_metric_list": aggregate,
                           "metadata": {"version": 1.0}}))
        replace_folder(tmp, folder)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
    return group, tasks
