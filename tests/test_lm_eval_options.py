"""lm-eval options per study and per task: few-shot, chat template, generation kwargs, a per-task search subset."""
import pytest
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.config import ConfigError
from evomerge.fitness import Fitness, FitnessError
from evomerge.studyfile import load_study
from tests.conftest import FITNESS, TINY, with_fitness, write_study

CHATML = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
          "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def resident():
    return AutoModelForCausalLM.from_pretrained(TINY / "base"), AutoTokenizer.from_pretrained(TINY / "base")


def fitness(tmp_path, resident, tokenizer=None, **fields):
    cfg = load_study(with_fitness(write_study(tmp_path), **fields)).fitness
    model, tok = resident
    return Fitness(cfg, model, tokenizer or tok, "cpu")


def prompts(f, task="tiny_up", limit=3):
    _, instances, _ = f._requests("search", task, limit, None)
    return [inst.args[0] for inst in instances]


def test_num_fewshot_and_gen_kwargs_reach_lm_eval_per_study_and_per_task(tmp_path, resident):
    tasks = [{"task": "tiny_up", "metric": "exact_match", "num_fewshot": 2, "gen_kwargs": {"max_gen_toks": 3}},
             {"task": "tiny_rot", "metric": "exact_match,none"}]
    f = fitness(tmp_path, resident, tasks=tasks, gen_kwargs={"max_gen_toks": 5, "temperature": 0.0})
    up, rot = f.tasks("search")["tasks"]["tiny_up"], f.tasks("search")["tasks"]["tiny_rot"]
    assert up.get_config("num_fewshot") == 2 and rot.get_config("num_fewshot") in (0, None)
    assert up.get_config("generation_kwargs")["max_gen_toks"] == 3
    assert rot.get_config("generation_kwargs")["max_gen_toks"] == 5
    assert rot.get_config("generation_kwargs")["until"] == ["\n"]  # updated, not replaced, as lm-eval does
    assert prompts(f)[0].count("\n\n") == 2 and "\n\n" not in prompts(f, "tiny_rot")[0]


def test_a_tasks_limit_is_its_search_subset_and_the_test_split_stays_whole(tmp_path, resident):
    tasks = [{"task": "tiny_up", "metric": "exact_match", "limit": 5}, {"task": "tiny_rot", "metric": "exact_match"}]
    f = fitness(tmp_path, resident, tasks=tasks, limit=None)
    search, test = f.score("search"), f.score("test")
    full = sum(1 for _ in (FITNESS / "rot_search.jsonl").open())
    assert search.examples == 5 + full
    assert test.examples == sum(1 for n in ("up_test", "rot_test") for _ in (FITNESS / f"{n}.jsonl").open())


def test_the_chat_template_wraps_prompts_and_few_shot_turns(tmp_path, resident):
    tok = AutoTokenizer.from_pretrained(TINY / "base")
    tok.chat_template = CHATML
    tasks = [{"task": "tiny_up", "metric": "exact_match", "num_fewshot": 1, "fewshot_as_multiturn": True},
             {"task": "tiny_rot", "metric": "exact_match", "apply_chat_template": False}]
    f = fitness(tmp_path, resident, tok, tasks=tasks, apply_chat_template=True)
    up = prompts(f)[0]
    assert up.startswith("<|user|>") and up.count("<|assistant|>") == 2 and up.endswith("<|assistant|>")
    assert "<|" not in prompts(f, "tiny_rot")[0]


def test_scoring_leaves_lm_eval_as_it_found_it(tmp_path, resident):
    """The template cache is installed only while a call renders templates: lm-eval's shared Jinja environment
    compiles afresh outside one, for any other user of lm-eval in the process."""
    from lm_eval.utils import env

    f = fitness(tmp_path, resident, limit=3)
    f.score("search")
    assert "from_string" not in vars(env) and f.forward_s > 0


def test_a_chat_template_the_tokenizer_lacks_is_refused(tmp_path, resident):
    with pytest.raises(FitnessError, match="apply_chat_template.*tokenizer has none"):
        fitness(tmp_path, resident, apply_chat_template=True)


def test_gen_kwargs_on_a_task_that_generates_nothing_are_refused(tmp_path, resident):
    f = fitness(tmp_path, resident, tasks=[{"task": "tiny_up", "metric": "exact_match", "gen_kwargs": {"x": 1}}])
    f.tasks("search")  # tiny_up generates: accepted
    tasks_dir = tmp_path / "tasks"
    tasks_dir.mkdir()
    (tasks_dir / "_data.py").write_text((FITNESS / "_data.py").read_text())
    for n in ("up_search", "up_test"):
        (tasks_dir / f"{n}.jsonl").write_text((FITNESS / f"{n}.jsonl").read_text())
    ll = yaml.safe_load((FITNESS / "tiny_up.yaml").read_text().replace("!function ", ""))
    ll.update(task="tiny_ll", output_type="loglikelihood", doc_to_target=" {{answer}}",
              metric_list=[{"metric": "acc", "aggregation": "mean", "higher_is_better": True}])
    ll.pop("generation_kwargs")
    text = yaml.safe_dump(ll).replace("custom_dataset: _data", "custom_dataset: !function _data")
    (tasks_dir / "tiny_ll.yaml").write_text(text)
    with pytest.raises(FitnessError, match=r"fitness\.tasks\.0\.gen_kwargs: .*loglikelihood"):
        fitness(tmp_path, resident, include_path=str(tasks_dir),
                tasks=[{"task": "tiny_ll", "metric": "acc", "gen_kwargs": {"max_gen_toks": 3}}])


@pytest.mark.parametrize("fields, where", [
    ({"fewshot_as_multiturn": True}, "fewshot_as_multiturn"),
    ({"num_fewshot": -1}, "fitness.num_fewshot"),
    ({"tasks": [{"task": "tiny_up", "limit": 0}]}, "fitness.tasks.0.limit"),
    ({"tasks": [{"task": "tiny_up", "gen_kwargs": "max_gen_toks=3"}]}, "fitness.tasks.0.gen_kwargs"),
    ({"tasks": [{"task": "p", "source": "perplexity", "search_split": "a.txt", "test_split": "b.txt",
                 "num_fewshot": 1}]}, "fitness.tasks.0"),
])
def test_bad_lm_eval_options_name_the_file_and_field(tmp_path, fields, where):
    path = with_fitness(write_study(tmp_path), **fields)
    with pytest.raises(ConfigError) as e:
        load_study(path)
    assert str(path) in str(e.value) and where in str(e.value)
