//! Schedule-Free AdamW (Defazio et al., "The Road Less Scheduled", NeurIPS 2024,
//! Algorithm 1) as a spec (see `specs` for the traits).
//!
//! The paper keeps three sequences: `z` (the AdamW iterate), `x` (its weighted average,
//! what is evaluated) and `y = (1−β1)·z + β1·x` (where the gradient is taken). The user's
//! parameters hold `y`, as in the authors' code; the state holds `z − y` (slot
//! `z_minus_y_`) and `v`, so one pass over three streams updates both sequences and `x` is
//! `y − (1−β1)/β1·(z − y)`, computed only when the caller asks for it (`eval`).

use crate::float::Real;
use crate::kernels;
use crate::parallel::{for_each, ByDtype};
use crate::phases::CopyItem;
use crate::specs::{Hyper, Spec, Update};
use crate::specs_elementwise::Arith;

/// `x` rounded to the parameter's precision.
#[inline(always)]
fn of<T: Real>(x: f64) -> T {
    T::from_f64(x)
}

/// The paper's `γ_t = γ·√(1−β2^t)·min(1, t/T_warmup)`: the learning rate with Adam's bias
/// correction of `v` and the linear warmup.
fn scheduled_lr(hyper: &Hyper, t: u64) -> f64 {
    let warmup = match hyper.warmup_steps {
        0 => 1.0,
        steps => (t as f64 / steps as f64).min(1.0),
    };
    hyper.lr * (1.0 - hyper.beta2.powf(t as f64)).sqrt() * warmup
}

/// What `x` is in terms of the parameters `y` and the state `z − y`:
/// `x = y + offset·(z − y)` with `offset = −(1−β1)/β1` (β1 > 0: with β1 = 0 the
/// parameters are `z` and the average is not kept), and `y = x − offset·(z − y)`.
pub fn average_offset(beta1: f64) -> f64 {
    -(1.0 - beta1) / beta1
}

/// Each group's offset of a move to the average (`to_average`) or back to `y`.
pub fn shift_offsets(groups: &[Hyper], to_average: bool) -> Vec<f64> {
    let sign = if to_average { 1.0 } else { -1.0 };
    groups
        .iter()
        .map(|hyper| sign * average_offset(hyper.beta1))
        .collect()
}

/// Moves parameters between `y` and `x` (`eval` and `train`): `p ← p + offset·(z − y)`
/// over every item (a parameter and its `z − y`, with the index of its group), each with
/// its group's offset, computed in f64 and rounded once.
pub fn shift(items: Vec<(CopyItem<'_>, u32)>, offsets: &[f64]) {
    let mut by_group: Vec<Vec<CopyItem<'_>>> = offsets.iter().map(|_| Vec::new()).collect();
    for (item, group) in items {
        by_group[group as usize].push(item);
    }
    for (items, &offset) in by_group.into_iter().zip(offsets) {
        for_each(items, |piece| match piece {
            ByDtype::Single(lanes) => kernels::axpy(lanes, offset),
            ByDtype::Double(lanes) => kernels::axpy(lanes, offset),
        });
    }
}

/// One step, with `u = g/(√v + ε) + λ·y` (the weight decay taken at `y`, as in the
/// paper), `z' = z − γ_t·u`, `x' = (1−c)·x + c·z'` and `c = γ_t²/Σ_{i≤t} γ_i²`:
/// `v ← β2·v + (1−β2)·g² ; y ← y + c·(z−y) − γ_t·(1 − β1·(1−c))·u ;
/// (z−y) ← (1−c)·((z−y) − γ_t·β1·u)`.
#[derive(Clone, Copy, Debug)]
pub struct ScheduleFreeAdamW {
    beta2: f64,
    epsilon: f64,
    weight_decay: f64,
    /// `c_{t+1}`, the new iterate's weight in the average.
    averaging: f64,
    /// `γ_t·(1 − β1·(1−c))`, the step of `y` along `u`.
    y_step: f64,
    /// `γ_t·β1`, the step of `z − y` along `u` before the average shrinks it.
    offset_step: f64,
}

impl Spec<2> for ScheduleFreeAdamW {
    const SLOTS: [&'static str; 2] = ["z_minus_y_", "v_"];
    fn at_step(hyper: &Hyper, t: u64) -> ScheduleFreeAdamW {
        let lr = scheduled_lr(hyper, t);
        // `weight_sum` already holds this step's `γ_t²` (`carry`); it is 0 only while every
        // `γ_i` was, and then the average keeps what it has (the authors' code).
        let averaging = match hyper.weight_sum {
            0.0 => 0.0,
            sum => lr * lr / sum,
        };
        ScheduleFreeAdamW {
            beta2: hyper.beta2,
            epsilon: hyper.epsilon,
            weight_decay: hyper.weight_decay,
            averaging,
            y_step: lr * (1.0 - hyper.beta1 * (1.0 - averaging)),
            offset_step: lr * hyper.beta1,
        }
    }
    fn l2(_: &Hyper) -> f64 {
        0.0
    }
    fn carry(hyper: &Hyper, t: u64) -> Hyper {
        let lr = scheduled_lr(hyper, t);
        Hyper {
            weight_sum: hyper.weight_sum + lr * lr,
            ..*hyper
        }
    }
}

impl<T: Arith> Update<T, 2> for ScheduleFreeAdamW {
    #[inline(always)]
    fn element(&self, y: T, g: f64, [offset, v]: &mut [T; 2]) -> T {
        let g: T = of(g);
        *v = of::<T>(self.beta2) * *v + of::<T>(1.0 - self.beta2) * g * g;
        let u = g / (v.sqrt() + of(self.epsilon)) + of::<T>(self.weight_decay) * y;
        let z_minus_y = *offset;
        *offset = of::<T>(1.0 - self.averaging) * (z_minus_y - of::<T>(self.offset_step) * u);
        y + of::<T>(self.averaging) * z_minus_y - of::<T>(self.y_step) * u
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYPER: Hyper = Hyper {
        lr: 0.01,
        momentum: 0.9,
        beta1: 0.9,
        beta2: 0.99,
        epsilon: 1e-8,
        weight_decay: 0.1,
        nesterov: false,
        warmup_steps: 0,
        weight_sum: 0.0,
    };

    fn close(x: f64, y: f64) -> bool {
        (x - y).abs() <= 1e-14 * y.abs().max(1e-300)
    }

    /// Runs the paper's three sequences, `z` and `x` explicit, beside the spec on `y` and
    /// `z − y`.
    #[test]
    fn the_offset_form_follows_the_papers_sequences() {
        let hyper = Hyper {
            warmup_steps: 3,
            ..HYPER
        };
        let (b1, b2, eps, wd) = (hyper.beta1, hyper.beta2, hyper.epsilon, hyper.weight_decay);
        let (mut z, mut x, mut v, mut sum) = (1.5f64, 1.5f64, 0.0f64, 0.0f64);
        let (mut carried, mut y, mut state) = (hyper, 1.5f64, [0.0f64; 2]);
        for t in 1..=20u64 {
            let y_paper = (1.0 - b1) * z + b1 * x;
            assert!(close(y, y_paper), "t={t}: {y} {y_paper}");
            let g = (y_paper - 0.3).sin() + 0.2;
            v = b2 * v + (1.0 - b2) * g * g;
            let lr = 0.01 * (1.0 - b2.powf(t as f64)).sqrt() * (t as f64 / 3.0).min(1.0);
            z -= lr * (g / (v.sqrt() + eps) + wd * y_paper);
            sum += lr * lr;
            let c = lr * lr / sum;
            x = (1.0 - c) * x + c * z;
            carried = ScheduleFreeAdamW::carry(&carried, t);
            assert!(close(carried.weight_sum, sum));
            y = ScheduleFreeAdamW::at_step(&carried, t).element(y, g, &mut state);
            assert!(
                (state[0] - (z - ((1.0 - b1) * z + b1 * x))).abs() <= 1e-15,
                "t={t}"
            );
            assert!(
                (y + average_offset(b1) * state[0] - x).abs() <= 1e-14,
                "t={t}"
            );
        }
    }

    #[test]
    fn a_zero_learning_rate_leaves_the_average_alone() {
        let hyper = Hyper { lr: 0.0, ..HYPER };
        let carried = ScheduleFreeAdamW::carry(&hyper, 1);
        assert_eq!(carried.weight_sum, 0.0);
        let spec = ScheduleFreeAdamW::at_step(&carried, 1);
        let mut state = [0.25f64, 0.0];
        assert_eq!(spec.element(2.0, 1.0, &mut state), 2.0);
        assert_eq!(state[0], 0.25);
        assert_eq!(ScheduleFreeAdamW::l2(&HYPER), 0.0);
    }
}
