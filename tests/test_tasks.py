"""Task data: users' JSONL chat formats, task files, and the built-in tasks (parsers on small synthetic WordNet and
FreeDict snippets, splits, the cache, export), plus one real-data test (slow, network)."""

from __future__ import annotations

import gzip
import json
import shutil
import time
from collections import Counter
from pathlib import Path

import pytest

from lmforge.errors import ConfigError, DataError, LmforgeError
from lmforge.tasks import lexical
from lmforge.tasks.arithmetic import arithmetic_rows
from lmforge.tasks.builtin import (ensure_source, instruction_conversations, load_rows, load_task, split_rows,
                                   task_sizes)
from lmforge.tasks.commands import TasksExportConfig, TasksListConfig, tasks_export, tasks_list
from lmforge.tasks.formats import FORMATS, read_conversations, to_record, write_jsonl
from lmforge.tasks.freedict import is_usable_pair, parse_example_line, read_example_pairs, translate_rows
from lmforge.tasks.spec import INSTRUCTION_TASKS, PREFERENCE_TASKS, SPLITS, TASKS, split_of
from lmforge.tasks.taskfile import load_task_file
from lmforge.tasks.wordnet import definition_of, load_wordnet, parse_data_line

# ---- chat formats --------------------------------------------------------------------------------------------


def _write(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines),
                    encoding="utf-8")
    return path


def test_every_format_is_read(tmp_path):
    path = _write(tmp_path / "mixed.jsonl", [
        {"instruction": "Add.", "input": "2 + 2", "output": "4", "system": "Be brief."},
        "",
        {"instruction": "Say hi.", "output": "hi"},
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                      {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]},
        {"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "q"},
                           {"from": "gpt", "value": "r"}, {"from": "user", "value": "q2"},
                           {"from": "model", "value": "r2"}]},
        {"prompt": "p", "completion": "c"},
    ])
    conversations = read_conversations(path)
    assert conversations[0] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add.\n\n2 + 2"},
                                {"role": "assistant", "content": "4"}]
    assert conversations[1] == [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}]
    assert [t["role"] for t in conversations[2]] == ["user", "assistant", "user", "assistant"]
    assert [t["role"] for t in conversations[3]] == ["system", "user", "assistant", "user", "assistant"]
    assert conversations[4] == [{"role": "user", "content": "p"}, {"role": "assistant", "content": "c"}]
    assert read_conversations(_write(tmp_path / "pc.jsonl", [{"prompt": "p", "completion": "c"}]),
                              format="prompt_completion") == [conversations[4]]


@pytest.mark.parametrize("line, message", [
    ("{not json", r"bad\.jsonl:2: not valid JSON"),
    ("[1, 2]", r"bad\.jsonl:2: expected a JSON object, got list"),
    ({"text": "x"}, r"bad\.jsonl:2: not a known chat format \(keys: text\); expected alpaca \(instruction, output; "
                    r"optional input, system\); or messages \(messages: \[\{role, content\}\]\); or sharegpt "
                    r"\(conversations: \[\{from, value\}\]\); or prompt_completion \(prompt, completion\)"),
    ({"messages": [{"role": "bot", "content": "x"}]},
     r"bad\.jsonl:2: messages\[0\]: unknown role 'bot' \(allowed: system, user, assistant\)"),
    ({"conversations": [{"from": "robot", "value": "x"}]},
     r"bad\.jsonl:2: conversations\[0\]: unknown from 'robot' \(allowed: human, user, gpt, assistant, model, system\)"),
    ({"messages": [{"role": "user", "content": "only a question"}]},
     r"bad\.jsonl:2: the conversation has no assistant turn"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]},
     r"bad\.jsonl:2: messages\[0\]\.content: expected a string, got int"),
    ({"instruction": "x", "output": None}, r"bad\.jsonl:2: output: expected a string, got NoneType"),
    ({"messages": "hello"}, r"bad\.jsonl:2: messages: expected a list of \{role, content\} objects, got str"),
    ({"instruction": "x"}, r"bad\.jsonl:2: missing output for format alpaca"),
])
def test_bad_chat_lines_name_file_and_line(tmp_path, line, message):
    path = _write(tmp_path / "bad.jsonl", [{"prompt": "p", "completion": "c"}, line])
    with pytest.raises(DataError, match=message) as info:
        read_conversations(path)
    assert "\n" not in str(info.value)


def test_empty_missing_and_undecodable_files(tmp_path):
    with pytest.raises(DataError, match=r"empty\.jsonl: no records"):
        read_conversations(_write(tmp_path / "empty.jsonl", ["", "  "]))
    with pytest.raises(DataError, match=r"nope\.jsonl: not found"):
        read_conversations(tmp_path / "nope.jsonl")
    (tmp_path / "latin1.jsonl").write_bytes(b'{"prompt": "p", "completion": "c"}\n{"prompt": "\xe9"}\n')
    with pytest.raises(DataError, match=r"latin1\.jsonl:2: not valid UTF-8"):
        read_conversations(tmp_path / "latin1.jsonl")
    with pytest.raises(DataError, match="format: expected auto or one of"):
        read_conversations(_write(tmp_path / "ok.jsonl", [{"prompt": "p", "completion": "c"}]), format="csv")


def test_export_round_trips_through_every_format(tmp_path):
    single = [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    multi = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
             {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]
    for fmt in FORMATS:
        conversations = [single[1:]] if fmt == "prompt_completion" else [single]
        conversations += [multi] if fmt in ("messages", "sharegpt") else []
        path = write_jsonl(tmp_path / f"{fmt}.jsonl", [to_record(c, fmt) for c in conversations])
        assert read_conversations(path) == conversations
        assert read_conversations(path, format=fmt) == conversations
    with pytest.raises(DataError, match="format alpaca holds an optional system turn, then one user and one "
                                        "assistant turn; this conversation has user, assistant, user, assistant"):
        to_record(multi, "alpaca")
    with pytest.raises(DataError, match="format prompt_completion holds one user and one assistant turn"):
        to_record(single, "prompt_completion")
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temp files


# ---- task files ----------------------------------------------------------------------------------------------


def test_task_file_items(tmp_path):
    gen = load_task_file(_write(tmp_path / "gen.jsonl", [{"prompt": "2+2?", "answer": "4"},
                                                          {"prompt": "hi", "answers": ["hello", "hey"], "id": "x"}]))
    assert [(e.id, e.prompt, e.answers, e.label, e.task) for e in gen] == [
        ("gen.jsonl:1", "2+2?", ["4"], -1, "gen"), ("x", "hi", ["hello", "hey"], -1, "gen")]
    mc = load_task_file(_write(tmp_path / "mc.jsonl", [{"question": "q", "choices": ["a", "b", "c"], "label": 2}]))
    assert (mc[0].prompt, mc[0].choices, mc[0].label, mc[0].answers) == ("q", ["a", "b", "c"], 2, ["c"])


@pytest.mark.parametrize("line, message", [
    ("nope", r"t\.jsonl:2: not valid JSON"),
    ('"text"', r"t\.jsonl:2: expected a JSON object, got str"),
    ({"answer": "4"}, r"t\.jsonl:2: no prompt \(a non-empty string\); expected \{\"prompt\", \"answer\"\}"),
    ({"prompt": "q"}, r"t\.jsonl:2: no answer; expected"),
    ({"prompt": "q", "answers": []}, r"t\.jsonl:2: answers: expected a list of at least 1 strings"),
    ({"prompt": "q", "choices": ["a", "b"], "label": 2}, r"t\.jsonl:2: label: expected an integer index in \[0, 1\]"),
    ({"prompt": "q", "choices": "ab", "label": 0}, r"t\.jsonl:2: choices: expected a list of at least 2 strings"),
    ({"prompt": "q", "choices": ["a", "b"], "label": True}, r"t\.jsonl:2: label: expected an integer index"),
])
def test_task_file_errors_name_file_and_line(tmp_path, line, message):
    with pytest.raises(DataError, match=message):
        load_task_file(_write(tmp_path / "t.jsonl", [{"prompt": "q", "answer": "a"}, line]))


def test_task_file_kinds_do_not_mix(tmp_path):
    with pytest.raises(DataError, match=r"t\.jsonl:2: a choice item in a file of generation items"):
        load_task_file(_write(tmp_path / "t.jsonl", [{"prompt": "q", "answer": "a"},
                                                      {"prompt": "q", "choices": ["a", "b"], "label": 0}]))
    with pytest.raises(DataError, match=r"e\.jsonl: no items"):
        load_task_file(_write(tmp_path / "e.jsonl", [""]))


# ---- synthetic WordNet and FreeDict -------------------------------------------------------------------------

# (offset, ss_type, lemmas, pointers, gloss); lemmas as in the data files, pointers as (symbol, offset, pos, s/t)
NOUNS = [
    ("00001740", "n", ["entity"], [], "that which is perceived or known or inferred to have its own existence"),
    ("00001930", "n", ["physical_entity"], [("@", "00001740", "n", "0000")], "an entity that has physical existence"),
    ("00002684", "n", ["object"], [("@", "00001930", "n", "0000")], "a tangible and visible entity"),
    ("00004000", "n", ["whole", "unit"], [("@", "00002684", "n", "0000")], "an assemblage of parts"),
    ("00004258", "n", ["organism", "being"], [("@", "00004000", "n", "0000")], "a living thing"),
    ("00015388", "n", ["animal", "beast"], [("@", "00004258", "n", "0000")], "a living organism that moves"),
    ("02083346", "n", ["canine", "canid"], [("@", "00015388", "n", "0000")], "any of various fissiped mammals"),
    ("02120997", "n", ["feline", "felid"], [("@", "00015388", "n", "0000")], "any of various lithe-bodied mammals"),
    ("02084071", "n", ["dog", "domestic_dog", "Canis_familiaris"], [("@", "02083346", "n", "0000")],
     'a member of the genus Canis that has been domesticated by man; "the dog barked all night"'),
    ("02114100", "n", ["wolf"], [("@", "02083346", "n", "0000")], "any of various predatory carnivorous canines"),
    ("02118333", "n", ["fox"], [("@", "02083346", "n", "0000")], "alert carnivorous mammal with pointed muzzle"),
    ("02115096", "n", ["jackal", "Canis_aureus"], [("@", "02083346", "n", "0000")], "Old World scavenger"),
    ("02121620", "n", ["cat", "true_cat"], [("@", "02120997", "n", "0000")], "a small domesticated carnivore, the house cat"),
    ("10287213", "n", ["man", "adult_male"], [("@", "00015388", "n", "0000"), ("!", "10787470", "n", "0101")],
     "an adult person who is male (as opposed to a woman)"),
    ("10787470", "n", ["woman", "adult_female"], [("@", "00015388", "n", "0000"), ("!", "10287213", "n", "0101")],
     "an adult female person (as opposed to a man)"),
]
ADJECTIVES = [
    ("01247240", "a", ["hot"], [("!", "01251128", "a", "0101"), ("&", "01248000", "a", "0000")],
     'used of physical heat; having a high temperature; "hot stove"'),
    ("01248000", "s", ["torrid"], [("&", "01247240", "a", "0000")], "extremely hot"),
    ("01251128", "a", ["cold"], [("!", "01247240", "a", "0101")], "having a low temperature"),
    ("00001740", "a", ["able(p)"], [], "having the necessary means or skill to do something"),
]
VERBS = [("01926311", "v", ["run"], [], "move fast by using one's feet")]
ADVERBS = [("00082844", "r", ["quickly", "rapidly"], [], "with rapid movements")]
FREEDICT = """00-database-info
English - German dictionary

extraction /ɛkstɹˈakʃən/
Abbau <masc>, Förderung <fem>
      "the extraction of coal"  - die Förderung von Kohle
      "large-volume extraction"  - Großraumförderung
      "put sth. together in a hurry"  - etw. schnell zusammenschustern
      "be/to count among the best"  - zu den Besten gehören
      "family-size package"  - Familienpackung
      "reduce a fraction"  - einen Bruch kürzen
      "thin out seedlings"  - Sämlinge vereinzeln, verziehen
      "My brothers are opposites."  - Meine Brüder sind gegensätzlich., Sie sind verschieden.
      "Hunters and farmers found common ground."  - Jäger und Bauern fanden, was sie eint.
      "with a number of cycles greater than \x85"  - bei einer Zyklenzahl von über \x85
      "the extraction of coal"  - die Förderung von Kohle
      "a kernel of truth"  - ein Körnchen Wahrheit
      "a grain of truth"  - ein Körnchen Wahrheit
      "take a long walk"  - einen langen Spaziergang machen
      "take a long walk"  - lange spazieren gehen
"""


def _data_line(offset, ss_type, lemmas, pointers, gloss):
    words = " ".join(f"{lemma} 0" for lemma in lemmas)
    ptrs = "".join(f" {s} {o} {p} {st}" for s, o, p, st in pointers)
    return f"{offset} 03 {ss_type} {len(lemmas):02x} {words} {len(pointers):03d}{ptrs} | {gloss}  \n"


def write_wordnet(root: Path) -> Path:
    """A tiny WordNet dict dir in the real file formats (data.* and index.*, with a license header line)."""
    root.mkdir(parents=True, exist_ok=True)
    for name, pos, synsets in (("noun", "n", NOUNS), ("verb", "v", VERBS), ("adj", "a", ADJECTIVES),
                               ("adv", "r", ADVERBS)):
        lines = ["  1 This software and database is being provided to you, the LICENSEE...\n"]
        lines += [_data_line(*synset) for synset in synsets]
        (root / f"data.{name}").write_text("".join(lines))
        senses: dict[str, list[str]] = {}
        for offset, _, lemmas, _, _ in synsets:
            for lemma in lemmas:
                senses.setdefault(lemma.split("(")[0].lower(), []).append(offset)
        index = ["  1 This software and database is being provided to you...\n"]
        index += [f"{lemma} {pos} {len(offsets)} 0 {len(offsets)} 0 {' '.join(offsets)}  \n"
                  for lemma, offsets in sorted(senses.items())]
        (root / f"index.{name}").write_text("".join(index))
    return root


def write_task_cache(cache: Path) -> Path:
    """`cache` made to hold the two Debian packages, unpacked, with synthetic content (no download happens)."""
    write_wordnet(cache / "debian/wordnet-base/usr/share/wordnet")
    dictd = cache / "debian/dict-freedict-eng-deu/usr/share/dictd"
    dictd.mkdir(parents=True)
    with gzip.open(dictd / "freedict-eng-deu.dict.dz", "wt", encoding="utf-8") as f:
        f.write(FREEDICT)
    return cache


@pytest.fixture()
def fake_cache(tmp_path) -> Path:
    return write_task_cache(tmp_path / "cache")


def test_wordnet_line_parser():
    synset = parse_data_line(_data_line(*NOUNS[8]).rstrip("\n"), "n")
    assert synset.key == "n:02084071" and synset.lemmas == ["dog", "domestic dog", "Canis familiaris"]
    assert synset.definition == "a member of the genus Canis that has been domesticated by man"
    assert synset.hypernyms == ["n:02083346"]
    hot = parse_data_line(_data_line(*ADJECTIVES[0]).rstrip("\n"), "a")
    assert hot.antonyms == [(1, "a:01251128", 1)] and hot.similar == ["a:01248000"] and not hot.satellite
    assert parse_data_line(_data_line(*ADJECTIVES[3]), "a").lemmas == ["able"]
    assert parse_data_line("  1 This software and database", "n") is None
    assert definition_of('"an example only"') == "" and definition_of("a; b; `c'") == "a; b; 'c'"
    with pytest.raises(DataError, match="WordNet data.noun: malformed synset line"):
        parse_data_line("02084071 05 n zz dog", "n")


def test_wordnet_tasks_from_synthetic_files(tmp_path, monkeypatch):
    wn = load_wordnet(write_wordnet(tmp_path / "wn"))
    assert wn.first_sense("dog", "n") == "n:02084071" and wn.children["n:02083346"][0] == "n:02084071"
    rows = {r["id"]: r for r in lexical.hypernym_rows(wn)}
    assert rows["hypernym:n:02084071"]["answers"] == ["canine", "canid"]
    assert rows["hypernym:n:02084071"]["source"] == "n:02084071"
    antonyms = {r["id"]: r for r in lexical.antonym_rows(wn)}
    assert antonyms["antonym:hot"]["answers"] == ["cold"] and antonyms["antonym:man"]["answers"] == ["woman"]
    assert antonyms["antonym:hot"]["source"] == antonyms["antonym:cold"]["source"] == "antonym:cold"
    defines = {r["id"]: r for r in lexical.define_rows(wn)}
    assert defines["define:n:dog"]["answers"] == ["a member of the genus Canis that has been domesticated by man"]
    assert "define:n:Canis familiaris" not in defines  # not a plain lowercase word
    synonyms = {r["id"]: r for r in lexical.synonym_rows(wn)}
    assert synonyms["synonym:r:00082844"]["answers"] == ["rapidly"]
    names = {r["id"]: r for r in lexical.name_word_rows(wn)}
    assert names["name_word:n:02084071"]["answers"][0] == "dog"
    assert "name_word:n:02121620" not in names  # its definition says 'cat': it would give the answer away

    nli = {r["id"]: r for r in lexical.nli_candidates(wn)}
    contradiction = nli["nli:hot:not:cold"]
    assert contradiction["vars"] == {"premise": "It is hot.", "hypothesis": "It is cold."}
    assert contradiction["choices"][contradiction["label"]] == "contradiction"
    torrid = next(r for i, r in nli.items() if i.startswith("nli:a:01248000"))
    up = torrid["id"].endswith(":up")
    assert torrid["answers"] == ["entailment" if up else "neutral"]
    assert torrid["vars"]["premise"] == ("It is torrid." if up else "It is hot.")
    dog = next(r for i, r in nli.items() if i.startswith("nli:n:02084071"))
    assert dog["vars"]["premise" if dog["id"].endswith(":up") else "hypothesis"] == "This is a dog."
    balanced = lexical.balance_labels(list(nli.values()))
    counts = Counter((split_of(r["source"]), r["label"]) for r in balanced)
    for split in {s for s, _ in counts}:
        assert len({counts[(split, label)] for label in range(3)}) == 1

    monkeypatch.setattr(lexical, "split_of", lambda key: "train")  # all in one split: siblings come first
    mc = {r["id"]: r for r in lexical.mc_define_rows(wn)}["mc_define:n:02084071"]
    assert sorted(mc["choices"]) == ["dog", "fox", "jackal", "wolf"] and mc["choices"][mc["label"]] == "dog"


def test_mc_define_distractors_stay_in_their_split(tmp_path):
    wn = load_wordnet(write_wordnet(tmp_path / "wn"))
    heads = {wn.head(key): key for key in wn.synsets if wn.head(key)}
    for row in lexical.mc_define_rows(wn, n_choices=2):
        assert len(set(row["choices"])) == 2
        assert {split_of(wn.unit(heads[c])) for c in row["choices"]} == {split_of(row["source"])}


def test_freedict_pairs():
    assert parse_example_line('      "the extraction of coal"  - die Förderung von Kohle') == (
        "the extraction of coal", "die Förderung von Kohle")
    assert parse_example_line("Abbau <masc>") is None
    assert is_usable_pair("Some people cross the street.", "Manche Leute gehen, wenn es rot ist.")
    assert not is_usable_pair("thin out seedlings", "Sämlinge vereinzeln, verziehen")
    assert not is_usable_pair("family-size package", "Familienpackung")  # 2 words
    pairs = read_example_pairs(FREEDICT.split("\n"))
    assert pairs == [("the extraction of coal", "die Förderung von Kohle"), ("reduce a fraction", "einen Bruch kürzen"),
                     ("Hunters and farmers found common ground.", "Jäger und Bauern fanden, was sie eint."),
                     ("a kernel of truth", "ein Körnchen Wahrheit"), ("a grain of truth", "ein Körnchen Wahrheit")]
    rows = {r["id"]: r for r in translate_rows(pairs)}
    # pairs that share a side are one group: they get the same key, so the same split
    assert rows["translate:a grain of truth"]["source"] == rows["translate:a kernel of truth"]["source"] == \
        "translate:a grain of truth"


def test_arithmetic_answers_are_exact_and_deterministic():
    rows = arithmetic_rows(2000, seed=3)
    assert rows == arithmetic_rows(2000, seed=3) and rows != arithmetic_rows(2000, seed=4)
    assert len({r["id"] for r in rows}) == len(rows) > 1900
    for row in rows:
        a, op, b = int(row["vars"]["a"]), row["vars"]["op"], int(row["vars"]["b"])
        assert int(row["answers"][0]) == {"+": a + b, "-": a - b, "*": a * b}[op] >= 0
        assert 10 <= a <= 9999 and 1 <= b <= 9999


# ---- splits, cache and loading -------------------------------------------------------------------------------


def test_split_rule_is_fixed_and_proportional():
    assert [split_of(k) for k in ("n:02084071", "antonym:cold", "arithmetic:347 + 58")] == \
        ["train", "train", split_of("arithmetic:347 + 58")]
    counts = Counter(split_of(f"key{i}") for i in range(20000))
    assert abs(counts["train"] / 20000 - 0.8) < 0.01 and abs(counts["test"] / 20000 - 0.1) < 0.01
    rows = arithmetic_rows(3000)
    splits = split_rows(rows, eval_cap=100)
    assert len(splits["test"]) == len(splits["validation"]) == 100
    sources = [{r["source"] for r in splits[s]} for s in SPLITS]
    assert not (sources[0] & sources[1] or sources[0] & sources[2] or sources[1] & sources[2])
    assert split_rows(list(reversed(rows)), eval_cap=100) == splits  # order does not depend on input order


def test_builtin_tasks_from_a_synthetic_cache(fake_cache, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda tool: None)  # any download attempt would fail
    sizes = task_sizes(fake_cache)
    assert set(sizes) == set(TASKS) and sizes["arithmetic"]["test"] == 500
    for name in TASKS:
        loaded = {split: load_task(name, split, fake_cache) for split in SPLITS}
        assert sum(map(len, loaded.values())) == sum(sizes[name].values())
        sources = [{e.source for e in loaded[split]} for split in SPLITS]
        assert not (sources[0] & sources[1] or sources[0] & sources[2] or sources[1] & sources[2]), name
        assert all(split_of(e.source) == split for split in SPLITS for e in loaded[split])
    translate = {e.id: e for split in SPLITS for e in load_task("translate", split, fake_cache)}
    assert translate["translate:the extraction of coal"].prompt == "Translate into German: the extraction of coal"
    assert load_task("arithmetic", "test", fake_cache, limit=7) == load_task("arithmetic", "test", fake_cache)[:7]
    # a second build in another cache dir writes byte-identical files
    other = fake_cache.parent / "other"
    shutil.copytree(fake_cache / "debian", other / "debian")
    for source in ("wordnet", "freedict"):
        first, second = ensure_source(source, fake_cache), ensure_source(source, other)
        assert sorted(p.name for p in first.iterdir()) == sorted(p.name for p in second.iterdir())
        assert all((first / p.name).read_bytes() == (second / p.name).read_bytes() for p in first.iterdir())


def test_instruction_mixture(fake_cache):
    conversations = instruction_conversations("train", fake_cache, per_task_limit=20)
    assert conversations == instruction_conversations("train", fake_cache, per_task_limit=20)
    assert conversations != instruction_conversations("train", fake_cache, per_task_limit=20, seed=1)
    assert all([t["role"] for t in c] == ["user", "assistant"] for c in conversations)
    n = sum(min(20, len(load_rows(name, "train", fake_cache))) for name in INSTRUCTION_TASKS)
    assert len(conversations) == n  # every task but the preference sets
    nli = instruction_conversations("train", fake_cache, tasks=["nli"])
    assert {c[1]["content"] for c in nli} == {"entailment", "neutral", "contradiction"}  # the gold choice
    answers = {c[1]["content"] for c in instruction_conversations("train", fake_cache, tasks=["arithmetic"])}
    assert all(answer.isdigit() for answer in answers)
    prompts = {c[0]["content"].split(" ")[0] for c in instruction_conversations("train", fake_cache,
                                                                                 tasks=["arithmetic"])}
    assert prompts == {"What", "Compute", "Calculate"}  # phrasings vary


def test_tasks_list_and_export(fake_cache, tmp_path, capsys):
    sizes = tasks_list(TasksListConfig(cache_dir=str(fake_cache)))
    printed = capsys.readouterr().out
    assert "arithmetic      generate   exact_match" in printed and "define_pref     preference accuracy" in printed and f"{sizes['nli']['train']:>7}" in printed
    for fmt in ("messages", "alpaca", "sharegpt", "prompt_completion"):
        out = tasks_export(TasksExportConfig("arithmetic", "test", str(tmp_path / f"a-{fmt}.jsonl"), fmt, 5,
                                             str(fake_cache)))
        examples = load_task("arithmetic", "test", fake_cache, 5)
        assert read_conversations(out) == [[{"role": "user", "content": e.prompt},
                                            {"role": "assistant", "content": e.answers[0]}] for e in examples]
    items = load_task_file(tasks_export(TasksExportConfig("nli", "train", str(tmp_path / "nli.jsonl"), "task", 0,
                                                          str(fake_cache))))
    assert [(i.prompt, i.choices, i.label) for i in items] == [
        (e.prompt, e.choices, e.label) for e in load_task("nli", "train", fake_cache)]


def test_preference_sets_pair_the_right_answer_with_a_wrong_one_in_the_same_split(fake_cache, tmp_path):
    from lmforge.tasks.preferences import builtin_preferences, read_preferences

    for name, base in (("define_pref", "define"), ("translate_pref", "translate"), ("arithmetic_pref", "arithmetic")):
        for split in SPLITS:
            rows = load_rows(name, split, fake_cache)
            base_rows = {r["source"]: r for r in load_rows(base, split, fake_cache)}
            assert rows or split != "train", name
            for row in rows:
                chosen, rejected = row["choices"]
                assert row["label"] == 0 and chosen == row["answers"][0] and chosen != rejected
                assert split_of(row["source"]) == split  # the split of the question it derives from
                assert row["source"] in base_rows or split != "train"  # (eval splits are capped samples)
    wrong = {r["choices"][1] for r in load_rows("arithmetic_pref", "train", fake_cache)}
    assert all(w.isdigit() for w in wrong)
    # a define_pref rejected answer is the definition of a sibling synset (sharing a hypernym)
    wn = load_wordnet(fake_cache / "debian/wordnet-base/usr/share/wordnet")
    for row in load_rows("define_pref", "train", fake_cache):
        key = wn.first_sense(row["vars"]["word"], "n") or wn.first_sense(row["vars"]["word"], "v")
        parents = set(wn.synsets[key].hypernyms)
        assert any(set(s.hypernyms) & parents and s.definition == row["choices"][1] for s in wn.synsets.values())
    items = builtin_preferences("train", fake_cache)
    assert {i.where.split()[0] for i in items} == set(PREFERENCE_TASKS)
    out = tasks_export(TasksExportConfig("translate_pref", "train", str(tmp_path / "t.jsonl"), "messages", 0,
                                         str(fake_cache)))
    exported = read_preferences([out])
    assert [(i.prompt[0]["content"], i.responses) for i in exported] == [
        (e.prompt, e.choices) for e in load_task("translate_pref", "train", fake_cache)]


def test_export_refuses_what_it_must_not_replace(fake_cache, tmp_path):
    def export(out: Path, name: str = "arithmetic") -> Path:
        return tasks_export(TasksExportConfig(name, out=str(out), cache_dir=str(fake_cache)))

    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "old.jsonl").write_text("not json at all\n")
    (tmp_path / "dir").mkdir()
    for out, message in ((tmp_path / "notes.txt", "exists and is not a .jsonl file"),
                         (tmp_path / "old.jsonl", "exists and does not hold JSONL records"),
                         (tmp_path / "dir", "is a directory")):
        with pytest.raises(LmforgeError, match=message):
            export(out)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    previous = export(tmp_path / "ok.jsonl")
    assert export(previous) == previous  # an earlier export is replaced
    with pytest.raises(ConfigError, match=r"unknown task 'nope' \(built-in tasks: define, name_word, synonym"):
        export(tmp_path / "x.jsonl", "nope")


# ---- the real data -------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.network
def test_real_builtin_tasks():
    """Fetches wordnet-base and dict-freedict-eng-deu into $LMFORGE_CACHE (once) and builds every task."""
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        pytest.skip("apt-get/dpkg-deb not available on this machine")
    try:
        sizes = task_sizes()
    except DataError as exc:
        pytest.skip(f"apt-get download failed here: {exc}")
    started = time.perf_counter()
    loaded = {name: {split: load_task(name, split) for split in SPLITS} for name in TASKS}
    assert time.perf_counter() - started < 20  # every split of every task, from the cache
    for name, splits in loaded.items():
        assert len(splits["test"]) == len(splits["validation"]) == 500, name
        assert len(splits["train"]) > {"antonym": 4000, "nli": 10000}.get(name, 20000), name
        sources = [{e.source for e in splits[split]} for split in SPLITS]
        prompts = [{e.prompt for e in splits[split]} for split in SPLITS]
        for first, second in ((0, 1), (0, 2), (1, 2)):
            assert not sources[first] & sources[second] and not prompts[first] & prompts[second], name
    assert sizes["define"]["train"] == len(loaded["define"]["train"])
    train = {name: {e.id: e for e in loaded[name]["train"]} for name in TASKS}
    assert {"canine", "domestic animal"} <= set(train["hypernym"]["hypernym:n:02084071"].answers)
    assert train["antonym"]["antonym:hot"].answers[0] == "cold"
    assert train["translate"]["translate:the extraction of coal"].answers == ["die Förderung von Kohle"]
    assert train["define"]["define:n:dog"].answers[0].startswith("a member of the genus Canis")
    nli_labels = Counter(e.label for split in SPLITS for e in loaded["nli"][split])
    assert max(nli_labels.values()) - min(nli_labels.values()) < 0.1 * max(nli_labels.values())
    for example in loaded["arithmetic"]["test"]:
        a, op, b = example.id.split(":")[1].split()
        assert int(example.answers[0]) == {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
