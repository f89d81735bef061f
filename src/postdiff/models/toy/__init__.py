"""The embedded toy PT/IT pair, trained offline on the CPU from the made-up world.

``corpus`` writes the training text, ``tokenizer`` the BPE, ``train`` the models and the
stage functions ``build_tokenizer``, ``train_pt`` and ``train_it``.
"""
