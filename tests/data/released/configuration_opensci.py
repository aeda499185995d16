# Test stand-in for the release's configuration file (see modeling_opensci.py next to it): it must
# never be imported or run by the pipeline.
import os as _os

open(_os.environ.get("OSREF_TEST_EXECUTED_MARKER", "/tmp/osref-remote-code-was-executed"), "a").write(__file__ + "\n")

from transformers.configuration_utils import PretrainedConfig


class OpensciConfig(PretrainedConfig):
    model_type = "opensci"
