"""``data/samplers.py``: grouped batches, resuming inside an epoch, and the shards of several processes."""

import math


def test_grouped_order_keeps_batches_in_one_group_and_resumes_exactly():
    from maskrcnn_coco.data.samplers import TrainSampler, aspect_ratio_groups, group_batches

    assert aspect_ratio_groups([(640, 480), (480, 640), (100, 100), (1000, 100)], factor=0) == [1, 0, 1, 1]
    groups = [i % 3 == 0 for i in range(23)]
    order = list(range(23))
    batches = group_batches(order, groups, 4)
    assert sorted(i for b in batches for i in b) == order
    # 8 of group True, 15 of group False: 2 + 3 batches of one group, then the 3 left over (mixed, partial).
    assert [len(b) for b in batches] == [4, 4, 4, 4, 4, 3]
    assert all(len({groups[i] for i in b}) == 1 for b in batches[:5])

    sampler = TrainSampler(23, seed=5, group_ids=groups, batch_size=4)
    sampler.set_epoch(2)
    whole = [i for i, _ in sampler]
    assert sorted(whole) == order and len(whole) == len(sampler) == 23
    assert all(len({groups[i] for i in whole[k:k + 4]}) == 1 for k in range(0, 16, 4))  # grouped batches first
    sampler.skip_next(8)  # two iterations trained
    assert [i for i, _ in sampler] == whole[8:]

    ranks = [TrainSampler(23, seed=5, group_ids=groups, batch_size=4, rank=r, world_size=2) for r in range(2)]
    shards = []
    for s in ranks:
        s.set_epoch(2)
        shards.append([i for i, _ in s])
    assert set(shards[0]) | set(shards[1]) == set(order)
    assert math.ceil(len(shards[0]) / 4) == math.ceil(len(shards[1]) / 4) == math.ceil(ranks[0].num_samples / 4)

    single = TrainSampler(23, seed=5, group_ids=[0] * 23, batch_size=4)  # one group: the plain order
    plain = TrainSampler(23, seed=5)
    single.set_epoch(2)
    plain.set_epoch(2)
    assert list(single) == list(plain)


def test_shards_cover_the_set_once():
    """Validation shards: every image exactly once even when the count does not divide; training
    shards: equal lengths (padded), together a permutation of the set plus the padding."""
    from maskrcnn_coco.data.samplers import ShardSampler, TrainSampler

    val = [list(ShardSampler(7, rank=r, world_size=2)) for r in (0, 1)]
    assert sorted(val[0] + val[1]) == list(range(7))
    train = []
    for r in (0, 1):
        sampler = TrainSampler(7, seed=3, rank=r, world_size=2)
        sampler.set_epoch(2)
        train.append([i for i, _ in sampler])
    assert len(train[0]) == len(train[1]) == 4 and set(train[0] + train[1]) == set(range(7))
