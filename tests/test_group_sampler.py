"""Group-balanced sampling of the pretraining stream (INPUT.REGIONSSL.BALANCE_GROUPS)."""
import itertools
from collections import Counter

import pytest

from regionssl.data.build import ResumableTrainingSampler, group_balanced_weights


def _dicts():
    # one clip of 8 frames, a stereo pair, and two single photos: 4 groups
    clip = [{"file_name": f"clip_{i}.jpg", "group": "clip"} for i in range(8)]
    pair = [{"file_name": f"pair_{i}.jpg", "group": "pair"} for i in range(2)]
    singles = [{"file_name": "a.jpg"}, {"file_name": "b.jpg"}]
    return clip + pair + singles


def test_weights_are_one_over_group_size():
    assert group_balanced_weights(_dicts()) == [1 / 8] * 8 + [1 / 2] * 2 + [1.0, 1.0]


def test_weighted_stream_draws_every_group_equally_often_and_is_seeded():
    dicts = _dicts()
    sampler = ResumableTrainingSampler(len(dicts), weights=group_balanced_weights(dicts), seed=3)
    drawn = list(itertools.islice(iter(sampler), 40000))
    groups = Counter(dicts[i].get("group", dicts[i]["file_name"]) for i in drawn)
    for g in ("clip", "pair", "a.jpg", "b.jpg"):  # each group 1/4 of the draws (binomial sd ~0.002)
        assert groups[g] / len(drawn) == pytest.approx(0.25, abs=0.01)
    frames = Counter(i for i in drawn if i < 8)  # frames of the clip equally likely among themselves
    assert max(frames.values()) / min(frames.values()) < 1.15
    again = ResumableTrainingSampler(len(dicts), weights=group_balanced_weights(dicts), seed=3)
    assert list(itertools.islice(iter(again), 500)) == drawn[:500]
    # resume: the stream continues after the images consumed before
    again.skip = 123
    assert list(itertools.islice(iter(again), 50)) == drawn[123:173]


def test_unweighted_stream_is_detectron2s():
    from detectron2.data.samplers import TrainingSampler

    ours = list(itertools.islice(iter(ResumableTrainingSampler(12, seed=5)), 60))
    d2 = list(itertools.islice(iter(TrainingSampler(12, seed=5)), 60))
    assert ours == d2
