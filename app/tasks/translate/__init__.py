"""Task ``translate``: SCAN commands in, action sequences out, equivariant over word swaps (Lake & Baroni, 2018).

Import-light on purpose: ``vocab`` and ``scan`` (the data, generated from SCAN's grammar), ``groups``
(the swaps acting on both vocabularies), ``seq2seq`` (the GRU/LSTM encoder-decoder), ``model``
(the served model) and ``training`` are imported by whoever needs them.
"""

from app.tasks import TaskParts

PARTS = TaskParts(
    model=".model:TranslateModel",
    http=".http:HTTP",
    limits=".settings:TranslateLimits",
    cli=".cli",
    docs="docs/scan.md",
)
