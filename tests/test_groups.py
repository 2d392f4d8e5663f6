"""RolloutISGroups from megatron.core's ProcessGroupCollection (a one-rank gloo world)."""

import pytest
import torch.distributed as dist

from megatron.core.process_groups_config import ProcessGroupCollection

from megatron_rollout_is.parallel.groups import RolloutISGroups, group_rank, group_size


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    store = dist.FileStore(str(tmp_path_factory.mktemp("store") / "file"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


def test_groups_come_from_a_complete_collection(world):
    collection = ProcessGroupCollection()
    collection.tp, collection.cp, collection.dp_cp = world, world, world
    groups = RolloutISGroups.from_process_group_collection(collection)
    assert (groups.tp, groups.cp, groups.dp_cp) == (world, world, world)
    assert group_size(groups.cp) == 1 and group_rank(groups.cp) == 0


def test_a_missing_group_is_an_error_not_silently_local(world):
    collection = ProcessGroupCollection()
    collection.tp = world
    with pytest.raises(ValueError, match="no cp, dp_cp group"):
        RolloutISGroups.from_process_group_collection(collection)
