"""The shards layer: documents tokenized into flat token shards, and the loader that trains from them.

- :mod:`~lmforge.shards.format`: the shard files (``.bin`` + index), completion records, ``manifest.json``;
- :mod:`~lmforge.shards.tokenize`: documents -> shards (multi-process, resumable);
- :mod:`~lmforge.shards.loader`: the packed, rank-sharded, exactly resumable loader (``DataConfig``);
- :mod:`~lmforge.shards.mixture` and :mod:`~lmforge.shards.curriculum`: domain weights and staged schedules;
- :mod:`~lmforge.shards.commands`: ``lmforge shards tokenize|mixture``.
"""
