"""The Lightning plumbing shared by ``state tx train`` and ``state emb fit``.

Both commands decide what is theirs (the model, the data, the checkpoint names and monitor keys,
the training loop's lengths) and hand the rest to this layer:

* :mod:`.trainer`: one Trainer construction (accelerator, devices, strategy, precision policy, and
  the callbacks and plugins every run gets, assembled in one place);
* :mod:`.checkpoint_io`: atomic checkpoint files and the clean-up of a killed save;
* :mod:`.loggers`: the CSV logger that keeps history on resume and the optional W&B logger whose
  problems never stop training;
* :mod:`.progress_bar`: the one-bar-over-steps training progress bar.

This package sits below ``state.tx`` and ``state.emb``: it never imports them.
"""
