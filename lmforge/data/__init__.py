"""Raw text to token shards: `lmforge data prepare`.

One module per step, in pipeline order:
    corpora.py       built-in corpora (WordNet, KJV, GCIDE, Python docs, stdlib docstrings)
    sources.py       stream documents from text files, directories, globs, JSONL, Parquet and built-in corpora
    clean.py         normalize text, scrub PII, drop documents by length and quality heuristics
    dedup.py         drop exact and near (MinHash LSH) duplicates
    mixture.py       per-source sampling weights (GPT-3 style repeat/subsample)
    shards.py        the shard format: `ShardWriter` (fixed-size shards) and the reader (`TokenShards`, `read_meta`)
    prepare.py       `DataConfig` + `prepare_dataset`: the pipeline end to end

Submodules are imported explicitly (`from lmforge.data.prepare import DataConfig, prepare_dataset`) so that reading
shards during training does not import the cleaning and dedup dependencies.
"""
