import pytest
import torch

from longer.window import event_grid, gap_in_group, group_ts, n_groups, update_span, window_start


def grid_of(totals, k, max_len, loaded=None):
    total = torch.tensor(totals)
    lengths = torch.tensor(loaded) if loaded is not None else total.clamp(max=max_len)
    return event_grid(total, lengths, k, n_groups(max_len, k))


def groups_by_number(totals, k, max_len):
    """{(user, absolute group): tuple of absolute event indices} from a grid."""
    g = grid_of(totals, k, max_len)
    out = {}
    for b in range(len(totals)):
        for c in range(g.group.shape[1]):
            if g.group[b, c] >= 0:
                out[b, int(g.group[b, c])] = tuple(int(i) for i in g.index[b, c] if i >= 0)
    return out


def test_groups_align_to_absolute_index_and_window_slides_by_whole_groups():
    g = grid_of([0, 1, 5, 8, 9, 13], k=4, max_len=8)
    assert g.group.tolist() == [[-1, -1], [-1, 0], [0, 1], [0, 1], [1, 2], [2, 3]]
    # 9 events, max_len 8: the window keeps groups 1 (events 4..7) and 2 (event 8) — 5 events
    assert g.index[4, 0].tolist() == [4, 5, 6, 7] and g.index[4, 1].tolist() == [8, -1, -1, -1]
    assert g.valid.sum(dim=(1, 2)).tolist() == [0, 1, 5, 8, 5, 5]
    # the loaded events are the last min(T, max_len): user 4 loads events 1..8, so event 4 is at flat 3
    offsets = [0, 0, 1, 6, 14, 22]
    assert int(g.src[4, 0, 0]) == offsets[4] + 3


@pytest.mark.parametrize("k,max_len", [(1, 8), (2, 8), (4, 8), (3, 9), (8, 8)])
def test_appending_never_changes_a_kept_full_group(k, max_len):
    for total in range(0, 30):
        for n in (1, 2, 5, 11):
            before = groups_by_number([total], k, max_len)
            after = groups_by_number([total + n], k, max_len)
            span = update_span(total, n, k)
            for (b, grp), events in after.items():
                if grp < span.first_group:
                    assert before[b, grp] == events  # an old group that is kept is unchanged
                else:
                    assert all(i >= span.first_event for i in events)
            recomputed = {grp for (_, grp) in after if grp >= span.first_group}
            assert len(recomputed) == min(span.n_groups, n_groups(max_len, k))  # at most the window
            assert max(g for _, g in after) - max((g for _, g in before), default=-1) == span.slide
            assert len(after) == min(n_groups(max_len, k), (total + n - 1) // k + 1)


def test_window_holds_between_max_len_minus_k_plus_one_and_max_len_events():
    k, max_len = 4, 16
    for total in range(max_len, 60):
        g = grid_of([total], k, max_len)
        held = int(g.valid.sum())
        assert max_len - k + 1 <= held <= max_len, (total, held)
        assert int(window_start(torch.tensor([total]), k, 4)) == total - held


def test_loaded_events_must_cover_the_window():
    with pytest.raises(ValueError, match="sample 1 loads 3 of 9 events"):
        grid_of([4, 9], k=4, max_len=8, loaded=[4, 3])
    with pytest.raises(ValueError, match="a total of 2"):
        grid_of([2], k=4, max_len=8, loaded=[3])
    # more than the window needs is fine: the extra oldest events are not in the grid
    g = grid_of([9], k=4, max_len=8, loaded=[9])
    assert g.index[0][g.valid[0]].tolist() == [4, 5, 6, 7, 8]


def test_gather_gap_and_group_time():
    g = grid_of([6], k=4, max_len=8)  # groups 0 (events 0..3) and 1 (events 4, 5)
    ts = torch.tensor([10, 13, 13, 20, 50, 58])
    t = g.gather(ts)
    assert t.tolist() == [[[10, 13, 13, 20], [50, 58, 0, 0]]]
    assert gap_in_group(t, g.valid).tolist() == [[[0, 3, 0, 7], [0, 8, 0, 0]]]
    assert group_ts(t, g.valid).tolist() == [[20, 58]]
    assert g.newest_index().tolist() == [[3, 5]]


def test_update_span_examples():
    # 6 events, K 4: group 1 holds events 4, 5; 3 new events fill it and start group 2
    s = update_span(6, 3, 4)
    assert (s.first_event, s.first_group, s.n_groups, s.slide) == (4, 1, 2, 1)
    s = update_span(8, 1, 4)  # the last group was full: only the new group
    assert (s.first_event, s.first_group, s.n_groups, s.slide) == (8, 2, 1, 1)
    s = update_span(0, 2, 4)
    assert (s.first_event, s.first_group, s.n_groups, s.slide) == (0, 0, 1, 1)
    assert update_span(7, 0, 4).n_groups == 0
    with pytest.raises(ValueError):
        update_span(-1, 1, 4)
    with pytest.raises(ValueError, match="must divide"):
        n_groups(10, 4)
