//! Fused element-wise passes over flat slices: each element's streams are read and written
//! once. `update` applies a base optimizer's spec (`specs`) with SAM's restore and GSAM's
//! mix fused in; `perturb`, `restore` and `mix_into` are SAM's and GSAM's own passes.

use crate::float::{Norm, Real, WideFactor};
use crate::parallel::{Lanes, Split};
use crate::specs::Update;

/// Gradient clipping, resolved to what happens to one element once the global norm is
/// known: `g ↦ clamp(g·factor, −limit, limit)`. Off is factor 1 and an infinite limit, both
/// exact no-ops on finite values, so every update runs one branch-free loop.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Clip {
    factor: f64,
    limit: f64,
}

impl Clip {
    pub const OFF: Clip = Clip {
        factor: 1.0,
        limit: f64::INFINITY,
    };

    /// Clamp every element to `[-limit, limit]`.
    pub fn value(limit: f64) -> Clip {
        Clip { factor: 1.0, limit }
    }

    /// Scale every element (norm clipping: `c/‖g‖`).
    pub fn scale(factor: f64) -> Clip {
        Clip {
            factor,
            limit: f64::INFINITY,
        }
    }

    #[inline(always)]
    fn apply(self, g: f64) -> f64 {
        (g * self.factor).max(-self.limit).min(self.limit)
    }
}

/// GSAM's surrogate-gap-guided gradient `a·g + b·g0` (with `g` the gradient at the
/// perturbed point and `g0` the one at the original point), used when a kernel gets `g0`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Mix {
    pub a: WideFactor,
    pub b: f64,
}

impl Mix {
    pub const PLAIN: Mix = Mix {
        a: WideFactor::ONE,
        b: 0.0,
    };
}

/// The gradient an update uses: mixed with `g0` for GSAM, then clipped.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GradientPlan {
    pub mix: Mix,
    pub clip: Clip,
}

impl GradientPlan {
    pub const PLAIN: GradientPlan = GradientPlan {
        mix: Mix::PLAIN,
        clip: Clip::OFF,
    };

    /// Without GSAM, `g0` is `g` itself and the mix `1·g + 0·g`, exactly `g` for finite
    /// values: one loop serves both, and reading `g` twice costs no memory traffic.
    #[inline(always)]
    pub fn gradient<T: Real>(self, g: T, g0: T) -> f64 {
        self.clip
            .apply(self.mix.a.apply(g.to_f64()) + self.mix.b * g0.to_f64())
    }
}

/// GSAM's mix for `g1 − α·g0⊥`, where `g0⊥ = g0 − (g0·g1/‖g1‖²)·g1` is the part of `g0`
/// orthogonal to `g1`: `a = 1 + α·(g0·g1)/‖g1‖² = (n1 + α·n0·cos)/n1`, `b = −α`. Takes the
/// norms `n0 = ‖g0‖`, `n1 = ‖g1‖` and `cos = (g0·g1)/(n0·n1)`, which keeps every
/// intermediate in range (`a` itself may not be: it is a `WideFactor`).
pub fn gsam_mix(alpha: f64, n0: f64, n1: Norm, cos: f64) -> Mix {
    let a = if n1.mantissa > 0.0 {
        WideFactor::ratio_scaled(n1.value() + alpha * n0 * cos, n1)
    } else {
        WideFactor::ONE
    };
    Mix { a, b: -alpha }
}

/// `‖a·g1 + b·g0‖` for GSAM's mix, from the same numbers, scaled so it cannot overflow.
pub fn mixed_norm(alpha: f64, n0: f64, n1: f64, cos: f64) -> f64 {
    // a·n1 = n1 + α·n0·cos (or n1 when n1 = 0); b = −α.
    let along = n1 + alpha * n0 * cos;
    let (x, y) = (along.abs(), alpha * n0);
    let largest = x.max(y);
    if largest == 0.0 {
        return 0.0;
    }
    let (x, y) = (x / largest, y / largest);
    let sign = -along.signum();
    largest * (x * x + 2.0 * sign * x * y * cos + y * y).max(0.0).sqrt()
}

/// The streams of a base optimizer's update over one piece of one parameter: the
/// parameter, its gradient, the optimizer's `N` state slots, where the step starts from
/// (`None`: the parameter itself; `Some(saved)`: SAM's saved values, so the restore costs
/// no pass of its own), GSAM's `g0` when the gradient is mixed, and the parameter's group.
pub struct UpdateLanes<'a, T, const N: usize> {
    pub param: &'a mut [T],
    pub grad: &'a [T],
    pub slots: [&'a mut [T]; N],
    pub start: Option<&'a [T]>,
    pub grad0: Option<&'a [T]>,
    pub group: u32,
}

impl<T, const N: usize> Split for UpdateLanes<'_, T, N> {
    fn split_at(self, mid: usize) -> (Self, Self) {
        let (param, param_tail) = Split::split_at(self.param, mid);
        let (grad, grad_tail) = Split::split_at(self.grad, mid);
        let (slots, slots_tail) = Split::split_at(self.slots, mid);
        let (start, start_tail) = Split::split_at(self.start, mid);
        let (grad0, grad0_tail) = Split::split_at(self.grad0, mid);
        let group = self.group;
        (
            UpdateLanes {
                param,
                grad,
                slots,
                start,
                grad0,
                group,
            },
            UpdateLanes {
                param: param_tail,
                grad: grad_tail,
                slots: slots_tail,
                start: start_tail,
                grad0: grad0_tail,
                group,
            },
        )
    }
}

impl<T: Send + Sync, const N: usize> Lanes for UpdateLanes<'_, T, N> {
    fn len(&self) -> usize {
        self.param.len()
    }
}

/// A base optimizer's step for one parameter group: the spec's scalars and the L2 penalty
/// `g ← g + l2·p` added to the (clipped, mixed) gradient, with the step's start value.
#[derive(Clone, Copy, Debug)]
pub struct GroupStep<U> {
    pub spec: U,
    pub l2: f64,
}

/// One step of the base optimizer over one piece, with the gradient `plan` says and the
/// spec of the piece's group.
pub fn update<T: Real, U: Update<T, N>, const N: usize>(
    lanes: UpdateLanes<'_, T, N>,
    groups: &[GroupStep<U>],
    plan: GradientPlan,
) {
    widest!(update_body(lanes, groups, plan))
}

kernel_body!(update_body[T: Real, U: Update<T, N>, const N: usize](
    lanes: UpdateLanes<'_, T, N>,
    groups: &[GroupStep<U>],
    plan: GradientPlan
) {
    let UpdateLanes { param, grad, slots, start, grad0, group } = lanes;
    let GroupStep { spec, l2 } = &groups[group as usize];
    let n = param.len();
    let grad = &grad[..n];
    let grad0 = grad0.map_or(grad, |s| &s[..n]);
    // With neither clipping nor a mix the gradient is `g` itself (exactly, for the finite
    // values an update is given): skip the eight operations per element.
    match (plan == GradientPlan::PLAIN, *l2 == 0.0) {
        (true, true) => update_loop(param, slots, start, |i, _| grad[i].to_f64(), spec),
        (false, true) => {
            update_loop(param, slots, start, |i, _| plan.gradient(grad[i], grad0[i]), spec)
        }
        (_, false) => update_loop(
            param,
            slots,
            start,
            |i, p0: T| plan.gradient(grad[i], grad0[i]) + l2 * p0.to_f64(),
            spec,
        ),
    }
});

#[allow(clippy::needless_range_loop)]
#[inline(always)]
fn update_loop<T: Real, U: Update<T, N>, const N: usize>(
    param: &mut [T],
    slots: [&mut [T]; N],
    start: Option<&[T]>,
    gradient: impl Fn(usize, T) -> f64,
    spec: &U,
) {
    let n = param.len();
    let mut slots = slots.map(|s| &mut s[..n]);
    match start {
        Some(start) => {
            let start = &start[..n];
            for i in 0..n {
                let p0 = start[i];
                param[i] = element_at(spec, p0, gradient(i, p0), &mut slots, i);
            }
        }
        None => {
            for i in 0..n {
                let p0 = param[i];
                param[i] = element_at(spec, p0, gradient(i, p0), &mut slots, i);
            }
        }
    }
}

#[inline(always)]
fn element_at<T: Real, U: Update<T, N>, const N: usize>(
    spec: &U,
    p0: T,
    g: f64,
    slots: &mut [&mut [T]; N],
    i: usize,
) -> T {
    let mut state: [T; N] = std::array::from_fn(|k| slots[k][i]);
    let p = spec.element(p0, g, &mut state);
    for k in 0..N {
        slots[k][i] = state[k];
    }
    p
}

/// The output buffer, the gradient at the perturbed point and `g0`.
pub type MixLanes<'a, T> = (&'a mut [T], &'a [T], &'a [T]);

/// `out ← a·g + b·g0`: GSAM's gradient, materialised for a base optimizer written in Python.
pub fn mix_into<T: Real>((out, g, g0): MixLanes<'_, T>, mix: Mix) {
    let n = out.len();
    let (g, g0) = (&g[..n], &g0[..n]);
    for i in 0..n {
        out[i] = T::from_f64(mix.a.apply(g[i].to_f64()) + mix.b * g0[i].to_f64());
    }
}

/// Parameter, gradient, the buffer that receives the parameter's value before the move,
/// (GSAM) a buffer that keeps the gradient, and the parameter's group.
pub type PerturbLanes<'a, T> = (&'a mut [T], &'a [T], &'a mut [T], Option<&'a mut [T]>, u32);

/// SAM's ascent `e` for one group: plain `ρ·g/n`, adaptive `ρ·T²⊙g/n` with
/// `T = |p| + eta`, or none (a group left out of the perturbation).
#[derive(Clone, Copy, Debug)]
pub enum Ascent {
    /// `ρ/n`.
    Plain { scale: WideFactor },
    /// `ρ/n` and eta.
    Adaptive { scale: WideFactor, eta: f64 },
    /// The parameter stays where it is (its value is still saved, for the restore).
    Keep,
}

/// `saved ← p ; p ← p + e` (and `kept ← g`), with the ascent of the piece's group.
pub fn perturb<T: Real>(lanes: PerturbLanes<'_, T>, ascents: &[Ascent]) {
    widest!(perturb_body(lanes, ascents))
}

kernel_body!(perturb_body[T: Real](lanes: PerturbLanes<'_, T>, ascents: &[Ascent]) {
    let (p, g, saved, kept, group) = lanes;
    let n = p.len();
    let (g, saved) = (&g[..n], &mut saved[..n]);
    match ascents[group as usize] {
        Ascent::Keep => saved.copy_from_slice(p),
        Ascent::Plain { scale } => {
            for i in 0..n {
                saved[i] = p[i];
                p[i] = T::from_f64(p[i].to_f64() + scale.apply(g[i].to_f64()));
            }
        }
        Ascent::Adaptive { scale, eta } => {
            for i in 0..n {
                saved[i] = p[i];
                let pi = p[i].to_f64();
                let t = pi.abs() + eta;
                // Scaled first: a subnormal g times T² would lose bits before the scale.
                p[i] = T::from_f64(pi + scale.apply(g[i].to_f64()) * (t * t));
            }
        }
    }
    if let Some(kept) = kept {
        kept.copy_from_slice(g);
    }
});

/// A destination and the values it receives.
pub type CopyLanes<'a, T> = (&'a mut [T], &'a [T]);

/// `dst ← src`, bit for bit: SAM's restore, and the copies around a base written in Python.
pub fn copy<T: Copy>((dst, src): CopyLanes<'_, T>) {
    dst.copy_from_slice(&src[..dst.len()]);
}

/// `dst ← dst + a·src`, computed in f64 and rounded once: gradient accumulation.
pub fn axpy<T: Real>((dst, src): CopyLanes<'_, T>, a: f64) {
    let n = dst.len();
    let src = &src[..n];
    for i in 0..n {
        dst[i] = T::from_f64(dst[i].to_f64() + a * src[i].to_f64());
    }
}

/// `dst ← a·src`, computed in f64 and rounded once.
pub fn scale<T: Real>((dst, src): CopyLanes<'_, T>, a: f64) {
    let n = dst.len();
    let src = &src[..n];
    for i in 0..n {
        dst[i] = T::from_f64(a * src[i].to_f64());
    }
}

/// A destination and the two streams it combines.
pub type CombineLanes<'a, T> = (&'a mut [T], &'a [T], &'a [T]);

/// `dst ← a·x + b·y`, computed in f64 and rounded once: the SAM family's mixes of two
/// gradients (LookSAM's `g_v` and its step in between, WSAM's, F-SAM's EMA and direction)
/// in one pass where a scale and an accumulation took two.
pub fn combine<T: Real>((dst, x, y): CombineLanes<'_, T>, a: f64, b: f64) {
    let n = dst.len();
    let (x, y) = (&x[..n], &y[..n]);
    for i in 0..n {
        dst[i] = T::from_f64(a * x[i].to_f64() + b * y[i].to_f64());
    }
}

/// A parameter, the buffer that keeps its current values and the values it receives.
pub type RestoreKeepingLanes<'a, T> = (&'a mut [T], &'a mut [T], &'a [T]);

/// `kept ← p ; p ← saved`: SAM's restore before a base written in Python, keeping the
/// perturbed values to put back should that base raise.
pub fn restore_keeping<T: Copy>((p, kept, saved): RestoreKeepingLanes<'_, T>) {
    let n = p.len();
    kept[..n].copy_from_slice(p);
    p.copy_from_slice(&saved[..n]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::specs::{Adam, Hyper, Sgd, Spec};

    const HYPER: Hyper = Hyper {
        lr: 0.1,
        momentum: 0.9,
        beta1: 0.9,
        beta2: 0.999,
        epsilon: 1e-8,
        weight_decay: 0.0,
        nesterov: false,
        warmup_steps: 0,
        weight_sum: 0.0,
    };

    fn step<U>(spec: U) -> GroupStep<U> {
        GroupStep { spec, l2: 0.0 }
    }

    #[test]
    fn l2_adds_the_penalty_of_the_start_value_per_group() {
        let mut p = [1.0f64, 1.0];
        let g = [0.5f64, 0.5];
        let mut vel = [0.0f64, 0.0];
        let saved = [2.0f64, 2.0];
        let sgd = Sgd::at_step(
            &Hyper {
                momentum: 0.0,
                ..HYPER
            },
            1,
        );
        let groups = [
            step(sgd),
            GroupStep {
                spec: sgd,
                l2: 0.25,
            },
        ];
        let (head, tail) = UpdateLanes {
            param: &mut p,
            grad: &g,
            slots: [&mut vel],
            start: Some(&saved),
            grad0: None,
            group: 1,
        }
        .split_at(1);
        update(head, &groups, GradientPlan::PLAIN);
        update(
            UpdateLanes { group: 0, ..tail },
            &groups,
            GradientPlan::PLAIN,
        );
        // Group 1: g + 0.25·2 = 1; group 0: g.
        assert_eq!(p, [2.0 - 0.1 * 1.0, 2.0 - 0.1 * 0.5]);
    }

    #[test]
    fn combine_rounds_once_from_f64() {
        // 0.1 + 3.77e-9 rounds to 0.1f32 once; rounding 0.1 first (a scale, then an
        // accumulation) lands one ulp higher.
        let b = 3.773_386_693_346_673e-9;
        let (x, y) = ([1.0f32], [1.0f32]);
        let mut dst = [0.0f32];
        combine((&mut dst, &x, &y), 0.1, b);
        assert_eq!(dst[0].to_bits(), ((0.1f64 + b) as f32).to_bits());
        assert_ne!(dst[0].to_bits(), ((f64::from(0.1f32) + b) as f32).to_bits());
    }

    #[test]
    fn a_kept_group_is_saved_and_not_moved() {
        let mut p = [-0.0f32, 3.0];
        let g = [1.0f32, 1.0];
        let mut saved = [9.0f32; 2];
        perturb(
            (&mut p, &g, &mut saved, None, 1),
            &[
                Ascent::Plain {
                    scale: WideFactor::ONE,
                },
                Ascent::Keep,
            ],
        );
        assert_eq!(p.map(f32::to_bits), [(-0.0f32).to_bits(), 3.0f32.to_bits()]);
        assert_eq!(saved, p);
    }

    #[test]
    fn update_starts_from_saved_values_and_clips() {
        let mut p = [1.0f64, -2.0];
        let g = [0.5f64, 4.0];
        let mut vel = [0.1f64, 0.0];
        let saved = [10.0f64, 20.0];
        let lanes = UpdateLanes {
            param: &mut p,
            grad: &g,
            slots: [&mut vel],
            start: Some(&saved),
            grad0: None,
            group: 0,
        };
        let plan = GradientPlan {
            mix: Mix::PLAIN,
            clip: Clip::value(1.0),
        };
        update(lanes, &[step(Sgd::at_step(&HYPER, 1))], plan);
        let v0 = 0.9 * 0.1 + 0.1 * 0.5;
        let v1 = 0.1 * 1.0;
        assert_eq!(vel, [v0, v1]);
        assert_eq!(p, [10.0 - v0, 20.0 - v1]);
    }

    #[test]
    fn update_matches_the_element_formula_across_pieces() {
        let n = 1000;
        let g: Vec<f32> = (0..n).map(|i| (i as f32 * 0.1).sin()).collect();
        let p0: Vec<f32> = (0..n).map(|i| (i as f32 * 0.3).cos()).collect();
        let adam = Adam::<true>::at_step(&HYPER, 3);
        let (mut p, mut m, mut v) = (p0.clone(), vec![0.01f32; n], vec![0.02f32; n]);
        let lanes = UpdateLanes {
            param: &mut p,
            grad: &g,
            slots: [&mut m, &mut v],
            start: None,
            grad0: None,
            group: 0,
        };
        // Cut in two, as the scheduler does: each element is updated alike.
        let (head, tail) = Split::split_at(lanes, 337);
        update(head, &[step(adam)], GradientPlan::PLAIN);
        update(tail, &[step(adam)], GradientPlan::PLAIN);
        for i in 0..n {
            let mut s = [0.01f32, 0.02f32];
            let expected = adam.element(p0[i], f64::from(g[i]), &mut s);
            assert_eq!((p[i], m[i], v[i]), (expected, s[0], s[1]));
        }
    }

    #[test]
    fn mixed_gradient_is_clipped_after_mixing() {
        let mut p = [0.0f64];
        let (g, g0) = ([2.0f64], [4.0f64]);
        let mut vel = [0.0f64];
        let mix = Mix {
            a: WideFactor::ratio(1.5, 1.0),
            b: -0.5,
        };
        let plain = Sgd::at_step(
            &Hyper {
                lr: 1.0,
                momentum: 0.0,
                ..HYPER
            },
            1,
        );
        let lanes = UpdateLanes {
            param: &mut p,
            grad: &g,
            slots: [&mut vel],
            start: None,
            grad0: Some(&g0),
            group: 0,
        };
        let plan = GradientPlan {
            mix,
            clip: Clip::value(0.75),
        };
        update(lanes, &[step(plain)], plan);
        // 1.5·2 − 0.5·4 = 1, clamped to 0.75.
        assert_eq!(p, [-0.75]);
    }

    #[test]
    fn perturb_then_restore_is_bitwise_exact() {
        let original: Vec<f32> = (0..101).map(|i| (i as f32 * 0.37).sin() * 1e3).collect();
        let g: Vec<f32> = (0..101).map(|i| (i as f32 * 1.3).cos()).collect();
        let mut p = original.clone();
        let mut saved = vec![0.0f32; 101];
        let mut kept = vec![0.0f32; 101];
        perturb(
            (&mut p, &g, &mut saved, Some(&mut kept), 0),
            &[Ascent::Adaptive {
                scale: WideFactor::ratio(0.05, 1.0),
                eta: 0.01,
            }],
        );
        assert_ne!(p, original);
        assert_eq!(kept, g);
        copy((&mut p, &saved));
        assert_eq!(p, original);
    }

    #[test]
    fn gsam_mix_removes_alpha_times_the_orthogonal_part() {
        let g1 = [3.0f64, 0.0];
        let g0 = [1.0f64, 2.0];
        let (n0, n1) = (5.0f64.sqrt(), 3.0);
        let cos = 3.0 / (n0 * n1);
        let mix = gsam_mix(0.4, n0, Norm::of(n1), cos);
        let mut out = [0.0f64; 2];
        mix_into((&mut out, &g1, &g0), mix);
        // g0⊥ = (0, 2): the direction is g1 − 0.4·(0, 2).
        assert!(
            (out[0] - 3.0).abs() < 1e-15 && (out[1] + 0.8).abs() < 1e-15,
            "{out:?}"
        );
        let norm = mixed_norm(0.4, n0, n1, cos);
        assert!((norm - (9.0f64 + 0.64).sqrt()).abs() < 1e-14, "{norm}");
        assert_eq!(
            gsam_mix(0.4, n0, Norm::of(0.0), 0.0),
            Mix {
                a: WideFactor::ONE,
                b: -0.4
            }
        );
    }

    #[test]
    fn gsam_mix_survives_a_vanishing_g1() {
        // a = 1 + α·n0·cos/n1 overflows, a·g1 does not.
        let mix = gsam_mix(0.4, 1.0, Norm::of(1e-310), 0.5);
        let d = mix.a.apply(1e-310) + mix.b * 1.0;
        assert!((d - (1e-310 + 0.4 * 0.5 - 0.4)).abs() < 1e-15, "{d}");
    }
}
