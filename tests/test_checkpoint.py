"""Checkpoints: a training process killed with SIGKILL resumes to the same result as an
uninterrupted run (1 thread); a checkpoint is never continued on other data or settings."""

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

WORKER = textwrap.dedent('''
    import os, signal, sys
    import numpy as np, torch
    torch.set_num_threads(1)
    import cellvi
    from cellvi.train import Callback

    model_name, mode, ckpt, out = sys.argv[1:5]

    class KillAt(Callback):
        """SIGKILL this process after epoch `at` of the run named `phase` (mid-training)."""
        def __init__(self, at):
            self.at, self.seen = at, 0
        def on_validation_end(self, epoch, history):
            self.seen += 1
            if self.seen == self.at:
                os.kill(os.getpid(), signal.SIGKILL)

    callbacks = [KillAt(int(mode[4:]))] if mode.startswith("kill") else []
    kwargs = dict(checkpoint_dir=ckpt, resume=mode == "resume") if mode != "plain" else {}
    if model_name.startswith("nbvae"):
        adata = cellvi.datasets.synthetic_counts(400, 40, n_groups=3, n_batches=2, seed=0)
        model = cellvi.models.NBVAE(adata, batch_key="batch", n_latent=4, n_hidden=16)
        if model_name == "nbvae-adversary":  # the batch classifier's state is resumed too
            kwargs.update(batch_penalty=50.0, penalty="adversary", penalty_groups=2)
        model.fit(max_epochs=12, patience=3, verbose=False, callbacks=callbacks, **kwargs)
        np.save(out, model.transform(adata).latent)
    else:
        adata = cellvi.datasets.synthetic_cytometry(600, 6, n_populations=3, seed=0)
        model = cellvi.models.GMVAE(adata, batch_key="batch", n_components=3, n_hidden=16)
        model.fit(max_epochs=8, warmup_epochs=3, verbose=False, callbacks=callbacks, **kwargs)
        res = model.transform(adata)
        np.save(out, np.c_[res.latent, res.probs])
''')


def _run(tmp_path, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", WORKER, *map(str, args)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("model, kill_at", [("nbvae", 5), ("nbvae-adversary", 5), ("gmvae", 6)])
def test_sigkill_mid_run_then_resume_gives_the_uninterrupted_result(tmp_path, model, kill_at):
    """gmvae: killed at the 6th epoch overall, i.e. in the mixture phase after the
    3-epoch warm-up; the resumed fit replays the warm-up from its finished checkpoint."""
    ckpt = tmp_path / "ckpt"
    plain = _run(tmp_path, model, "plain", ckpt, tmp_path / "plain.npy")
    assert plain.returncode == 0, plain.stderr
    killed = _run(tmp_path, model, f"kill{kill_at}", ckpt, tmp_path / "killed.npy")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (tmp_path / "killed.npy").exists() and any(ckpt.glob("*.safetensors"))
    assert not list(ckpt.glob("*.tmp"))
    resumed = _run(tmp_path, model, "resume", ckpt, tmp_path / "resumed.npy")
    assert resumed.returncode == 0, resumed.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "resumed.npy"), np.load(tmp_path / "plain.npy"))


def test_a_checkpoint_is_not_continued_on_other_settings(tmp_path, small_adata):
    from cellvi.errors import InvalidInputError
    from cellvi.models import NBVAE

    NBVAE(small_adata, n_latent=3).fit(max_epochs=2, verbose=False, checkpoint_dir=tmp_path)
    assert (tmp_path / "train.safetensors").exists()
    with pytest.raises(InvalidInputError, match="written for other data or settings"):
        NBVAE(small_adata, n_latent=4).fit(max_epochs=2, verbose=False, checkpoint_dir=tmp_path,
                                          resume=True)
    with pytest.raises(InvalidInputError, match="written for other data or settings"):
        NBVAE(small_adata, n_latent=3).fit(max_epochs=2, verbose=False, checkpoint_dir=tmp_path,
                                          resume=True, objective="iwae")  # another objective
    with pytest.raises(InvalidInputError, match="resume=True needs checkpoint_dir"):
        NBVAE(small_adata).fit(max_epochs=1, verbose=False, resume=True)
    # a finished run resumes to its end at once, with the same history
    a = NBVAE(small_adata, n_latent=3).fit(max_epochs=2, verbose=False, checkpoint_dir=tmp_path,
                                           resume=True)
    assert len(a.history["epoch"]) == 2
