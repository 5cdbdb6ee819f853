"""Task data: the JSONL chat formats users bring, and built-in tasks derived from real offline text.

    formats.py     read_conversations / to_record / write_jsonl: alpaca, OpenAI messages, ShareGPT, prompt/completion
    spec.py        TaskExample, TaskSpec, TASKS and the one split rule (a stable hash of each item's source key)
    wordnet.py     WordNet 3.0 parsed into synsets, pointers and senses
    lexical.py     the WordNet tasks (define, name_word, synonym, antonym, hypernym, nli, mc_define)
    freedict.py    English-German example pairs (translate)
    arithmetic.py  generated problems with exact answers
    templates.py   the prompt phrasings of each task
    builtin.py     load_task, the task cache, instruction_conversations (the SFT mixture)
    taskfile.py    load_task_file: users' JSONL eval items (generation or multiple choice)
    commands.py    `lmforge tasks list` and `lmforge tasks export`
"""

from lmforge.tasks.builtin import instruction_conversations, load_task
from lmforge.tasks.formats import read_conversations, to_record, write_jsonl
from lmforge.tasks.spec import TASKS, TaskExample, TaskSpec
from lmforge.tasks.taskfile import load_task_file

__all__ = ["TASKS", "TaskExample", "TaskSpec", "instruction_conversations", "load_task", "load_task_file",
           "read_conversations", "to_record", "write_jsonl"]
