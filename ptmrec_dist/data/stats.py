"""The text form of :meth:`~ptmrec_dist.data.interactions.Interactions.stats` (``ptmrec stats``
and the demo's statistics step)."""

from __future__ import annotations


def format_stats(stats: dict) -> str:
    s = stats["splits"]
    per_user = stats["interactions_per_user"]
    lines = [
        f"data:          {stats['path']} ({stats['format']})",
        f"users:         {stats['users']}",
        f"items:         {stats['items']}",
        f"interactions:  {stats['interactions']}  (density {stats['density']:.5f})",
        f"split:         train {s['train']} / valid {s['valid']} / test {s['test']}"
        f"  (rule: {stats['split_rule']})",
        f"per user:      min {per_user['min']}, median {per_user['median']:g}, max {per_user['max']}",
    ]
    if stats["duplicates_removed"]:
        lines.append(f"duplicates:    {stats['duplicates_removed']} removed")
    if stats["dropped_eval_without_train"]:
        lines.append(f"dropped:       {stats['dropped_eval_without_train']} valid/test rows of "
                     "users without train rows")
    return "\n".join(lines)
