import numpy as np
import pytest

from multitoken.errors import UserError
from multitoken.eval.heldout import prompt_windows, split_heldout


def test_split_heldout_halves_are_disjoint_and_cover_the_tokens():
    tokens = np.arange(101)
    calibration, evaluation = split_heldout(tokens)
    assert len(calibration) == 50 and len(evaluation) == 51
    assert np.array_equal(np.concatenate([calibration, evaluation]), tokens)


def test_prompt_windows_are_evenly_spaced_and_stay_inside():
    tokens = np.arange(100)
    windows = prompt_windows(tokens, 3, 10)
    assert [w[0] for w in windows] == [0, 44, 89]
    assert all(len(w) == 10 and w == list(range(w[0], w[0] + 10)) for w in windows)
    # Calibration and benchmark prompts taken from the two halves never share a token.
    calibration, evaluation = split_heldout(tokens)
    seen = {t for w in prompt_windows(calibration, 4, 10) for t in w}
    assert not seen & {t for w in prompt_windows(evaluation, 4, 10) for t in w}


def test_prompt_windows_reject_too_little_data():
    with pytest.raises(UserError, match="fewer than one prompt"):
        prompt_windows(np.arange(10), 1, 10)
