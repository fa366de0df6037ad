//! Lookahead (Zhang, Lucas, Hinton & Ba, NeurIPS 2019): the inner optimizer takes `k` fast
//! steps, then the slow weights move towards the fast ones and the fast weights restart
//! from them: `φ ← φ + α·(θ − φ) ; θ ← φ`. The slow weights start as the parameters'
//! values before the first fast step (a copy, `phases::copy`).

use crate::float::Real;
use crate::parallel::{for_each, ByDtype};

/// A parameter (the fast weights) and its slow weights.
pub type SyncLanes<'a, T> = (&'a mut [T], &'a mut [T]);
pub type SyncItem<'a> = ByDtype<SyncLanes<'a, f32>, SyncLanes<'a, f64>>;

/// `slow ← slow + α·(fast − slow) ; fast ← slow` over one piece, computed in f64 and
/// rounded once, so both end bitwise equal.
pub fn sync<T: Real>((fast, slow): SyncLanes<'_, T>, alpha: f64) {
    widest!(sync_body(fast, slow, alpha))
}

kernel_body!(sync_body[T: Real](fast: &mut [T], slow: &mut [T], alpha: f64) {
    let n = fast.len();
    let slow = &mut slow[..n];
    for i in 0..n {
        let s = slow[i].to_f64();
        let moved = T::from_f64(s + alpha * (fast[i].to_f64() - s));
        slow[i] = moved;
        fast[i] = moved;
    }
});

/// Lookahead's synchronisation over every parameter of a call.
pub fn synchronise(items: Vec<SyncItem<'_>>, alpha: f64) {
    for_each(items, |piece| match piece {
        ByDtype::Single(lanes) => sync(lanes, alpha),
        ByDtype::Double(lanes) => sync(lanes, alpha),
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sync_moves_slow_by_alpha_and_resets_fast() {
        let mut fast = [3.0f64, -1.0, 0.5];
        let mut slow = [1.0f64, 1.0, 0.5];
        sync((&mut fast, &mut slow), 0.25);
        assert_eq!(slow, [1.5, 0.5, 0.5]);
        assert_eq!(fast, slow);
        let (mut fast, mut slow) = ([1.0f32 + f32::EPSILON], [1.0f32]);
        sync((&mut fast, &mut slow), 1.0);
        assert_eq!(slow, [1.0 + f32::EPSILON]);
    }

    #[test]
    fn alpha_zero_puts_the_fast_weights_back() {
        let mut fast = vec![0.1f32; 70_000];
        let mut slow: Vec<f32> = (0..70_000).map(|i| i as f32).collect();
        let expected = slow.clone();
        synchronise(vec![ByDtype::Single((&mut fast[..], &mut slow[..]))], 0.0);
        assert_eq!(fast, expected);
        assert_eq!(slow, expected);
    }
}
