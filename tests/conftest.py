from __future__ import annotations

import pytest
import torch

from app.engine.sea import Engine
from models.rewards import Prompt
from models.tokens import render_prompt
from tests.tiny import tiny_lm

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def lm():
    return tiny_lm()


@pytest.fixture(scope="session")
def engine(lm):
    return Engine(lm)


@pytest.fixture
def make_prompt(lm):
    def make(text: str) -> Prompt:
        messages = [{"role": "user", "content": text}]
        return Prompt(messages, render_prompt(lm.tokenizer, messages))

    return make
