"""The data steps' public attributes are their configuration (the run fingerprint that a relaunch compares):
it must not depend on the process, e.g. through the iteration order of a set."""

import json
import os
import subprocess
import sys

import pytest

SCRIPT = """
import json
from lmforge.data.classifier import ClassifierFilter
from lmforge.data.dedup.exact import ExactDedup
from lmforge.data.dedup.lines import BoilerplateLineDedup, RepeatedSpanRemover
from lmforge.data.dedup.minhash import MinHashDedup
from lmforge.data.extract import HtmlExtractor, UnicodeFixer
from lmforge.data.filters import C4Filter, FineWebQualityFilter, GopherQualityFilter, GopherRepetitionFilter
from lmforge.data.langid import LanguageFilter
from lmforge.data.filters.ngram_perplexity import PerplexityFilter
from lmforge.data.pii import PiiRedactor
from lmforge.data.pipeline import step_config

steps = [ClassifierFilter("m.npz"), ExactDedup(), BoilerplateLineDedup(), RepeatedSpanRemover(), MinHashDedup(),
         HtmlExtractor(), UnicodeFixer(), C4Filter(bad_words=["b", "a", "c"]), FineWebQualityFilter(),
         GopherQualityFilter(), GopherRepetitionFilter(), LanguageFilter(languages=["ko", "en", "de", "fr"]),
         PerplexityFilter("lm.json.gz"), PiiRedactor()]
print(json.dumps([[s.name, step_config(s)] for s in steps], sort_keys=True))
"""


@pytest.mark.multiprocess
def test_step_configs_do_not_depend_on_the_hash_seed():
    outputs = set()
    for seed in ("1", "2", "3"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        result = subprocess.run(
            [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True
        )
        outputs.add(result.stdout)
    assert len(outputs) == 1
    configs = dict(json.loads(outputs.pop()))
    assert configs["language"]["languages"] == ["de", "en", "fr", "ko"]
    assert configs["gopher_quality"]["stop_words"][:2] == ["and", "be"]
