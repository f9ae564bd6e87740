"""Group-balanced sampling of the pretraining stream (INPUT.REGIONSSL.BALANCE_GROUPS)."""
import itertools
from collections import Counter

from regionssl.data.build import ResumableTrainingSampler, image_groups


def _dicts():
    # one clip of 8 frames, a stereo pair, and two single photos: 4 groups
    clip = [{"file_name": f"clip_{i}.jpg", "group": "clip"} for i in range(8)]
    pair = [{"file_name": f"pair_{i}.jpg", "group": "pair"} for i in range(2)]
    singles = [{"file_name": "a.jpg"}, {"file_name": "b.jpg"}]
    return clip + pair + singles


def test_group_labels():
    assert image_groups(_dicts()) == ["clip"] * 8 + ["pair"] * 2 + ["a.jpg", "b.jpg"]


def test_rounds_draw_every_group_once_and_members_uniformly():
    dicts = _dicts()
    groups = image_groups(dicts)
    sampler = ResumableTrainingSampler(len(dicts), groups=groups, seed=3)
    drawn = list(itertools.islice(iter(sampler), 4 * 2000))
    for r in range(0, len(drawn), 4):  # every round of 4 draws holds each group exactly once
        assert sorted(groups[i] for i in drawn[r : r + 4]) == ["a.jpg", "b.jpg", "clip", "pair"]
    frames = Counter(i for i in drawn if i < 8)  # 2000 clip draws spread over its 8 frames
    assert sum(frames.values()) == 2000 and set(frames) == set(range(8))
    assert max(frames.values()) / min(frames.values()) < 1.5
    pair = Counter(i for i in drawn if i in (8, 9))
    assert abs(pair[8] - pair[9]) < 200
    again = ResumableTrainingSampler(len(dicts), groups=groups, seed=3)
    assert list(itertools.islice(iter(again), 500)) == drawn[:500]  # seeded
    again.skip = 123  # resume: the stream continues after the images consumed before
    assert list(itertools.islice(iter(again), 50)) == drawn[123:173]


def test_unbalanced_stream_is_detectron2s():
    from detectron2.data.samplers import TrainingSampler

    ours = list(itertools.islice(iter(ResumableTrainingSampler(12, seed=5)), 60))
    d2 = list(itertools.islice(iter(TrainingSampler(12, seed=5)), 60))
    assert ours == d2
