"""The AST helper that every algorithm test uses to find Config fields no running code reads."""

import importlib.util
import textwrap

from tests.common.config_fields import unread_fields

SOURCE = '''
"""A fake algorithm file. Mentions cfg.only_doc in its docstring."""
from dataclasses import dataclass

from common import rl


@dataclass(frozen=True)
class Config:
    read_plain: int = 1
    """read as cfg.read_plain in update"""
    only_doc: int = 2
    """never read; its name is in docstrings (cfg.only_doc) and comments"""
    only_validate: int = 3
    """read only by validate"""
    via_runner_property: int = 4
    """read by num_updates, which the runner reads"""
    via_unread_property: int = 5
    """read by a property nothing reads"""
    prob_a: float = 0.1
    """read by getattr with an f-string"""
    via_alias: int = 6
    """read as c.via_alias after c = self.cfg"""
    via_used_property: int = 7
    """read by a property that update reads"""
    gae_lambda: float = 0.9
    """read only through rl.ppo_config(cfg), which copies the PPOConfig fields"""

    @property
    def num_updates(self):
        return self.via_runner_property

    @property
    def unused(self):
        return self.via_unread_property

    @property
    def used(self):
        return self.via_used_property * 2

    def validate(self):
        if self.only_validate < 0 or cfg.only_validate:
            raise ValueError("only_validate")


class Module:
    def __call__(self):
        c = self.cfg
        return c.via_alias


def update(state, cfg):
    # cfg.only_doc appears in this comment
    x = cfg.read_plain + cfg.used + rl.ppo_config(cfg).lr
    return [getattr(cfg, f"prob_{m}") for m in "a"], x
'''


def _load(tmp_path):
    path = tmp_path / "fake_algo.py"
    path.write_text(textwrap.dedent(SOURCE))
    spec = importlib.util.spec_from_file_location("fake_algo", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_docstrings_comments_validate_and_unread_properties_do_not_count(tmp_path):
    """Catches a text grep (would count only_doc), counting validate's reads (only_validate),
    counting every property body (via_unread_property), and missing aliases, getattr and
    properties that running code reads (a false alarm on via_alias, prob_a, via_used_property,
    via_runner_property) and the PPO fields rl.ppo_config copies (gae_lambda)."""
    assert unread_fields(_load(tmp_path)) == ["only_doc", "only_validate",
                                               "via_unread_property"]
