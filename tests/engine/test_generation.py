"""``Decoder``: the sampler and engine options the generating commands pass as one value."""

from __future__ import annotations

import pytest
from engine_support import model

from llada.engine.generation import DEFAULT_DECODER, Decoder


def test_a_decoder_makes_the_engine_its_options_ask_for() -> None:
    net = model()
    assert Decoder("reference").engine(net) is None
    engine = Decoder(deterministic=True).engine(net)
    assert engine.runtime.deterministic and not engine.runtime.compiled
    default = DEFAULT_DECODER.engine(net)
    assert not default.runtime.deterministic and not default.runtime.compiled
    with pytest.raises(ValueError, match="unknown sampler 'fast'"):
        Decoder("fast")  # type: ignore[arg-type]
