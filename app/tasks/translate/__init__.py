"""Task ``translate``: SCAN commands in, action sequences out, equivariant over word swaps (Lake & Baroni, 2018).

Import-light on purpose: ``vocab`` and ``scan`` (the data, generated from SCAN's grammar), ``groups``
(the swaps acting on both vocabularies), ``seq2seq`` (the GRU/LSTM encoder-decoder), ``runner``
(the batch runner) and ``model`` (the engine's ``ServedModel``) are imported by whoever needs them.
"""
