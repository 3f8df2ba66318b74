"""Model file of the demo (see README.md 'Model files'): `dacc compile dacc/models/demo/model.py`.

The transformer is called with batched classifier-free guidance, so its batch is twice the number
of images; the batch dimension is dynamic, so one program serves every grid size. The functions
are the trained models' shared recipe (dacc.models.flow.model_file).
"""
from __future__ import annotations

from dacc.models import flow
from dacc.models.demo import DEMO

build, example_inputs, more_example_inputs, sample = flow.model_file(DEMO)
