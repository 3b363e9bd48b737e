//! Spending a byte budget across tensors: a multiple-choice knapsack over each tensor's options.
//!
//! Every tensor has a few encodings, each with a size and a loss (a damage estimate), and
//! exactly one must be chosen per tensor so that the sizes fit a budget and the summed loss is
//! as small as can be. The exact problem is NP-hard; the greedy solution used here is the
//! classic one and is exact at every budget it lands on: keep only each tensor's options on the
//! lower convex hull of (size, loss) ([`lower_hull`]), start every tensor at its cheapest
//! option and repeatedly take the upgrade with the largest loss reduction per byte that still
//! fits ([`greedy`]). Hull steps of one tensor have decreasing slopes, so a tensor's upgrades are
//! taken in order, and the plan reached after each step is optimal among plans of at most its
//! size (the Lagrangian relaxation has no gap there). When the next best step does not fit,
//! cheaper steps that do are still taken, so the budget is used up.
//!
//! Losses must add up across tensors for the sum to mean anything: callers choose a loss that
//! does (the data-free weight error of [`crate::compress`], a divergence measured per tensor).

use alloc::vec;
use alloc::vec::Vec;

/// One option of one item: its size in bytes and its loss.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Point {
    /// Bytes the option costs.
    pub cost: u64,
    /// What the option loses (lower is better; finite).
    pub loss: f64,
}

/// The indices of `points` on their lower convex hull, cheapest first: each step costs more
/// and loses strictly less, at a rate (loss saved per byte) that only falls. Among options of
/// equal cost the one with the least loss is kept (the first on a tie). Empty for no points.
pub fn lower_hull(points: &[Point]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..points.len()).collect();
    order.sort_by(|&a, &b| {
        points[a]
            .cost
            .cmp(&points[b].cost)
            .then(points[a].loss.total_cmp(&points[b].loss))
    });
    let mut hull: Vec<usize> = Vec::new();
    for i in order {
        let p = points[i];
        // Only strictly less loss at a higher cost is worth a step.
        if let Some(&last) = hull.last() {
            if p.cost == points[last].cost || p.loss >= points[last].loss {
                continue;
            }
        }
        while let [.., a, b] = hull[..] {
            let (a, b) = (points[a], points[b]);
            let slope_ab = (a.loss - b.loss) / (b.cost - a.cost) as f64;
            let slope_bp = (b.loss - p.loss) / (p.cost - b.cost) as f64;
            if slope_bp >= slope_ab {
                hull.pop();
            } else {
                break;
            }
        }
        hull.push(i);
    }
    hull
}

/// A greedy plan: one option per item.
#[derive(Clone, Debug, PartialEq)]
pub struct Selection {
    /// Per item, the index of its chosen option (into that item's points).
    pub chosen: Vec<usize>,
    /// Summed cost of the chosen options.
    pub cost: u64,
    /// Summed loss of the chosen options.
    pub loss: f64,
    /// Loss saved per byte by the last upgrade taken (0 when none was): the price of a byte at
    /// this budget.
    pub rate: f64,
}

/// Chooses one option per item (`items[i]` its options, at least one each) within `budget`
/// bytes, greedily on each item's [`lower_hull`] (see the module docs). `None` when even the
/// cheapest options of all items together exceed the budget.
///
/// # Panics
/// When an item has no option.
pub fn greedy(items: &[Vec<Point>], budget: u64) -> Option<Selection> {
    let hulls: Vec<Vec<usize>> = items.iter().map(|p| lower_hull(p)).collect();
    assert!(
        hulls.iter().all(|h| !h.is_empty()),
        "every item needs an option"
    );
    let point = |i: usize, at: usize| items[i][hulls[i][at]];
    let mut at = vec![0usize; items.len()];
    let mut used = (0..items.len()).try_fold(0u64, |s, i| s.checked_add(point(i, 0).cost))?;
    if used > budget {
        return None;
    }
    let mut rate = 0.0;
    loop {
        let mut best: Option<(f64, usize)> = None;
        for i in 0..items.len() {
            if at[i] + 1 >= hulls[i].len() {
                continue;
            }
            let (cur, next) = (point(i, at[i]), point(i, at[i] + 1));
            let extra = next.cost - cur.cost;
            if extra > budget - used {
                continue;
            }
            let r = (cur.loss - next.loss) / extra as f64;
            if best.is_none_or(|(b, _)| r > b) {
                best = Some((r, i));
            }
        }
        let Some((r, i)) = best else { break };
        used += point(i, at[i] + 1).cost - point(i, at[i]).cost;
        at[i] += 1;
        rate = r;
    }
    let chosen: Vec<usize> = (0..items.len()).map(|i| hulls[i][at[i]]).collect();
    let loss = chosen
        .iter()
        .enumerate()
        .map(|(i, &c)| items[i][c].loss)
        .sum();
    Some(Selection {
        chosen,
        cost: used,
        loss,
        rate,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pts(v: &[(u64, f64)]) -> Vec<Point> {
        v.iter().map(|&(cost, loss)| Point { cost, loss }).collect()
    }

    /// Every combination of one option per item within `budget`: the least loss (brute force).
    fn best_by_enumeration(items: &[Vec<Point>], budget: u64) -> Option<f64> {
        let mut best: Option<f64> = None;
        let mut idx = vec![0usize; items.len()];
        loop {
            let cost: u64 = idx.iter().enumerate().map(|(i, &k)| items[i][k].cost).sum();
            if cost <= budget {
                let loss: f64 = idx.iter().enumerate().map(|(i, &k)| items[i][k].loss).sum();
                best = Some(best.map_or(loss, |b: f64| b.min(loss)));
            }
            let mut i = 0;
            loop {
                if i == items.len() {
                    return best;
                }
                idx[i] += 1;
                if idx[i] < items[i].len() {
                    break;
                }
                idx[i] = 0;
                i += 1;
            }
        }
    }

    #[test]
    fn hull_drops_dominated_and_non_convex_points() {
        // (5, 6) lies above the chord from (0, 10) to (10, 1): not on the hull.
        // (10, 4) costs as much as (10, 1) and loses more; (20, 1) saves nothing.
        let p = pts(&[
            (10, 4.0),
            (0, 10.0),
            (5, 6.0),
            (10, 1.0),
            (20, 1.0),
            (30, 0.0),
        ]);
        assert_eq!(lower_hull(&p), vec![1, 3, 5]);
        assert!(lower_hull(&[]).is_empty());
    }

    #[test]
    fn hand_computed_case() {
        // Item A: 0 B -> loss 10, 4 B -> 4, 8 B -> 3.
        // Item B: 0 B -> loss 6, 2 B -> 2, 10 B -> 0.
        // Budget 6: the only plans that fit are (0,0)=16, (4,0)=10, (0,2)=12, (4,2)=6: A at 4 B
        // and B at 2 B, loss 6, cost 6. Greedy: B's step saves 2/B, A's 1.5/B; then A's fits.
        let items = vec![
            pts(&[(0, 10.0), (4, 4.0), (8, 3.0)]),
            pts(&[(0, 6.0), (2, 2.0), (10, 0.0)]),
        ];
        let s = greedy(&items, 6).unwrap();
        assert_eq!(s.chosen, vec![1, 1]);
        assert_eq!((s.cost, s.loss), (6, 6.0));
        assert_eq!(s.rate, 1.5);
        // Budget 10: (8,2) loses 5, (4,2) 6, (0,10) 10: A's second step (0.25/B) is the only
        // one that fits after the first two.
        let s = greedy(&items, 10).unwrap();
        assert_eq!(s.chosen, vec![2, 1]);
        assert_eq!((s.cost, s.loss), (10, 5.0));
        // Budget 1: nothing but the cheapest options.
        assert_eq!(greedy(&items, 1).unwrap().chosen, vec![0, 0]);
        // Below the cheapest options: no plan.
        let costly = vec![pts(&[(3, 1.0), (5, 0.0)]), pts(&[(4, 2.0)])];
        assert_eq!(greedy(&costly, 6), None);
        assert_eq!(greedy(&costly, 7).unwrap().cost, 7);
    }

    #[test]
    fn exact_at_the_budgets_it_lands_on() {
        // Random items: whenever the greedy plan took every step in rate order (it stopped
        // with no step skipped for size), no plan of at most its cost loses less.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move |m: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % m
        };
        let mut checked = 0;
        for _ in 0..300 {
            let items: Vec<Vec<Point>> = (0..1 + next(4))
                .map(|_| {
                    (0..1 + next(4))
                        .map(|_| Point {
                            cost: next(20),
                            loss: next(100) as f64,
                        })
                        .collect()
                })
                .collect();
            let budget = next(60);
            let Some(s) = greedy(&items, budget) else {
                assert!(best_by_enumeration(&items, budget).is_none());
                continue;
            };
            assert!(s.cost <= budget);
            let best = best_by_enumeration(&items, budget).unwrap();
            assert!(best <= s.loss + 1e-9);
            // At its own cost the plan is optimal when one price per byte supports it: every
            // item's last step taken saved at least that much per byte, its next step at most.
            let slope = |p: &[Point], a: usize, b: usize| {
                (p[a].loss - p[b].loss) / (p[b].cost - p[a].cost) as f64
            };
            let (mut low, mut high) = (f64::INFINITY, 0.0f64);
            for (p, &c) in items.iter().zip(&s.chosen) {
                let h = lower_hull(p);
                let at = h.iter().position(|&k| k == c).unwrap();
                if at > 0 {
                    low = low.min(slope(p, h[at - 1], c));
                }
                if let Some(&n) = h.get(at + 1) {
                    high = high.max(slope(p, c, n));
                }
            }
            let on_path = low >= high;
            if on_path {
                checked += 1;
                assert_eq!(best_by_enumeration(&items, s.cost).unwrap(), s.loss);
            }
        }
        assert!(checked > 100, "only {checked} cases on the path");
    }
}
