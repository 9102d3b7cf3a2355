"""llada: Large Language Diffusion Models (LLaDA) in PyTorch — model, checkpoints, sampling, fast generation,
likelihood, training, evaluation and serving.

Packages by concern. Layers, lowest first: model, diffusion, engine, training, evaluation, server, cli.
A module imports only from its own layer or lower ones (``tests/test_layers.py`` reads every import
to check it): the network knows nothing of sampling, the paper's math nothing of the fast engine,
the engine nothing of training, and no library code imports the command line. Evaluation sits above
training for one reason: it reads JSONL with the training corpus reader. The public names below are
the stable API.
"""

from llada.diffusion.likelihood import LikelihoodEstimate, log_likelihood
from llada.diffusion.sampling import generate
from llada.engine.engine import Engine
from llada.engine.settings import Generation, GenerationSettings
from llada.model.config import PRESETS, ModelConfig, preset
from llada.model.transformer import LLaDAModel, ModelOutput

__all__ = ["PRESETS", "Engine", "Generation", "GenerationSettings", "LLaDAModel", "LikelihoodEstimate",
           "ModelConfig", "ModelOutput", "generate", "log_likelihood", "preset"]
__version__ = "0.1.0"
