//! tensorlogic-train's other element-wise optimizers as specs (see `specs` for the traits):
//! Adagrad, RMSprop, NAdam, AdaMax, RAdam, AdaBelief and Lion. Each keeps the crate's slot
//! names and, where the crate departs from the optimizer's paper, follows the paper.
//!
//! Arithmetic: as for Adam, the optimizers whose update divides compute float32 parameters
//! in float32 (in float64 the division, and the square root, made the kernel compute-bound
//! on float32 data); Lion computes in float64 and rounds once on store. Lion must: its sign
//! of `β1·m + (1−β1)·g` is then the one a float64 computation from the stored values gives.

use std::ops::{Add, Div, Mul, Sub};

use crate::float::Real;
use crate::specs::{Hyper, Spec, Update};

/// The arithmetic of an update that runs at the parameter's own precision.
pub trait Arith:
    Real + Add<Output = Self> + Sub<Output = Self> + Mul<Output = Self> + Div<Output = Self>
{
    fn sqrt(self) -> Self;
    fn max(self, other: Self) -> Self;
    fn abs(self) -> Self;
}

impl Arith for f32 {
    #[inline(always)]
    fn sqrt(self) -> f32 {
        f32::sqrt(self)
    }
    #[inline(always)]
    fn max(self, other: f32) -> f32 {
        f32::max(self, other)
    }
    #[inline(always)]
    fn abs(self) -> f32 {
        f32::abs(self)
    }
}

impl Arith for f64 {
    #[inline(always)]
    fn sqrt(self) -> f64 {
        f64::sqrt(self)
    }
    #[inline(always)]
    fn max(self, other: f64) -> f64 {
        f64::max(self, other)
    }
    #[inline(always)]
    fn abs(self) -> f64 {
        f64::abs(self)
    }
}

/// `x` rounded to the parameter's precision.
#[inline(always)]
fn of<T: Real>(x: f64) -> T {
    T::from_f64(x)
}

/// `1 − β^t`, the bias correction of a moment with decay `β` after `t` steps (`powf` is the
/// C library's `pow`, as Python's `**` on floats).
fn correction(beta: f64, t: u64) -> f64 {
    1.0 - beta.powf(t as f64)
}

/// Adagrad (Duchi, Hazan & Singer, 2011), the crate's form:
/// `s ← s + g² ; p ← p − lr·g/(√s + ε)`; weight decay is L2.
#[derive(Clone, Copy, Debug)]
pub struct Adagrad {
    lr: f64,
    epsilon: f64,
}

impl Spec<1> for Adagrad {
    const SLOTS: [&'static str; 1] = ["sum_squared_grads_"];
    fn at_step(hyper: &Hyper, _: u64) -> Adagrad {
        Adagrad {
            lr: hyper.lr,
            epsilon: hyper.epsilon,
        }
    }
}

impl<T: Arith> Update<T, 1> for Adagrad {
    #[inline(always)]
    fn element(&self, p0: T, g: f64, [s]: &mut [T; 1]) -> T {
        let g: T = of(g);
        *s = *s + g * g;
        p0 - of::<T>(self.lr) * g / (s.sqrt() + of(self.epsilon))
    }
}

/// RMSprop (Tieleman & Hinton, 2012), the crate's form with `α = beta2`:
/// `v ← α·v + (1−α)·g² ; p ← p − lr·g/(√v + ε)`; weight decay is L2.
#[derive(Clone, Copy, Debug)]
pub struct RmsProp {
    lr: f64,
    alpha: f64,
    epsilon: f64,
}

impl Spec<1> for RmsProp {
    const SLOTS: [&'static str; 1] = ["v_"];
    fn at_step(hyper: &Hyper, _: u64) -> RmsProp {
        RmsProp {
            lr: hyper.lr,
            alpha: hyper.beta2,
            epsilon: hyper.epsilon,
        }
    }
}

impl<T: Arith> Update<T, 1> for RmsProp {
    #[inline(always)]
    fn element(&self, p0: T, g: f64, [v]: &mut [T; 1]) -> T {
        let g: T = of(g);
        *v = of::<T>(self.alpha) * *v + of::<T>(1.0 - self.alpha) * g * g;
        p0 - of::<T>(self.lr) * g / (v.sqrt() + of(self.epsilon))
    }
}

/// The momentum schedule of NAdam (Dozat, 2016): `μ_t = β1·(1 − ½·0.96^(t/250))`.
const NADAM_SCHEDULE_BASE: f64 = 0.96;
const NADAM_SCHEDULE_STEPS: f64 = 250.0;

/// `ln(1 − ½·0.96^(t/250))`, the schedule's factor of `μ_t` without `β1`.
fn nadam_log_factor(t: u64) -> f64 {
    let decay = NADAM_SCHEDULE_BASE.ln() / NADAM_SCHEDULE_STEPS;
    (-0.5 * (decay * t as f64).exp()).ln_1p()
}

/// `Σ_{i=1..t} ln(1 − ½·q^i)` with `q = 0.96^(1/250)`, in O(1) rather than O(t): expanding
/// each logarithm, `−Σ_k (½^k/k)·q^k·(1 − q^(kt))/(1 − q^k)`, whose terms shrink by half
/// at least; every one is positive, so the sum loses nothing to cancellation.
fn nadam_log_schedule_sum(t: u64) -> f64 {
    let decay = NADAM_SCHEDULE_BASE.ln() / NADAM_SCHEDULE_STEPS;
    let steps = t as f64;
    let mut sum = 0.0;
    let mut half_power = 1.0;
    for k in 1..=80 {
        half_power *= 0.5;
        let kd = decay * f64::from(k);
        // q^k·(1 − q^(kt))/(1 − q^k), each factor from exp/expm1 of a negative argument.
        let geometric = kd.exp() * (kd * steps).exp_m1() / kd.exp_m1();
        let term = half_power / f64::from(k) * geometric;
        sum += term;
        if term <= sum * 1e-18 {
            break;
        }
    }
    -sum
}

/// NAdam (Dozat, 2016) as PyTorch writes the paper's algorithm: with
/// `μ_t = β1·(1 − ½·0.96^(t/250))` and `Π_t = μ_1⋯μ_t`,
/// `m ← β1·m + (1−β1)·g ; v ← β2·v + (1−β2)·g² ; d = √(v/(1−β2^t)) + ε ;
/// p ← p − lr·(1−μ_t)/(1−Π_t)·g/d − lr·μ_{t+1}/(1−Π_t·μ_{t+1})·m/d`; weight decay is L2.
#[derive(Clone, Copy, Debug)]
pub struct NAdam {
    beta1: f64,
    beta2: f64,
    epsilon: f64,
    /// `1/√(1−β2^t)`.
    inv_root_correction: f64,
    /// `lr·(1−μ_t)/(1−Π_t)`, the gradient's step.
    gradient_step: f64,
    /// `lr·μ_{t+1}/(1−Π_t·μ_{t+1})`, the momentum's step.
    momentum_step: f64,
}

impl Spec<2> for NAdam {
    const SLOTS: [&'static str; 2] = ["m_", "v_"];
    fn at_step(hyper: &Hyper, t: u64) -> NAdam {
        let log_beta1 = hyper.beta1.ln();
        let log_mu = log_beta1 + nadam_log_factor(t);
        let log_mu_next = log_beta1 + nadam_log_factor(t + 1);
        let log_product = t as f64 * log_beta1 + nadam_log_schedule_sum(t);
        // 1 − e^x as −expm1(x): exact where the product is close to 1.
        let one_minus = |log: f64| -log.exp_m1();
        NAdam {
            beta1: hyper.beta1,
            beta2: hyper.beta2,
            epsilon: hyper.epsilon,
            inv_root_correction: 1.0 / correction(hyper.beta2, t).sqrt(),
            gradient_step: hyper.lr * one_minus(log_mu) / one_minus(log_product),
            momentum_step: hyper.lr * log_mu_next.exp() / one_minus(log_product + log_mu_next),
        }
    }
}

impl<T: Arith> Update<T, 2> for NAdam {
    #[inline(always)]
    fn element(&self, p0: T, g: f64, [m, v]: &mut [T; 2]) -> T {
        let g: T = of(g);
        *m = of::<T>(self.beta1) * *m + of::<T>(1.0 - self.beta1) * g;
        *v = of::<T>(self.beta2) * *v + of::<T>(1.0 - self.beta2) * g * g;
        let d = v.sqrt() * of(self.inv_root_correction) + of(self.epsilon);
        p0 - (of::<T>(self.gradient_step) * g + of::<T>(self.momentum_step) * *m) / d
    }
}

/// AdaMax (Kingma & Ba, 2015, §7.1), the crate's form: `m ← β1·m + (1−β1)·g ;
/// u ← max(β2·u, |g|) ; p ← p − lr/(1−β1^t)·m/(u + ε)`; weight decay is L2.
#[derive(Clone, Copy, Debug)]
pub struct AdaMax {
    lr_t: f64,
    beta1: f64,
    beta2: f64,
    epsilon: f64,
}

impl Spec<2> for AdaMax {
    const SLOTS: [&'static str; 2] = ["m_", "u_"];
    fn at_step(hyper: &Hyper, t: u64) -> AdaMax {
        AdaMax {
            lr_t: hyper.lr / correction(hyper.beta1, t),
            beta1: hyper.beta1,
            beta2: hyper.beta2,
            epsilon: hyper.epsilon,
        }
    }
}

impl<T: Arith> Update<T, 2> for AdaMax {
    #[inline(always)]
    fn element(&self, p0: T, g: f64, [m, u]: &mut [T; 2]) -> T {
        let g: T = of(g);
        *m = of::<T>(self.beta1) * *m + of::<T>(1.0 - self.beta1) * g;
        *u = (of::<T>(self.beta2) * *u).max(g.abs());
        p0 - of::<T>(self.lr_t) * *m / (*u + of(self.epsilon))
    }
}

/// RAdam (Liu et al., 2020), the crate's form: with `ρ∞ = 2/(1−β2) − 1` and
/// `ρ_t = ρ∞ − 2t·β2^t/(1−β2^t)`, `m ← β1·m + (1−β1)·g ; v ← β2·v + (1−β2)·g²` and, when
/// `ρ_t > 5` (the authors' code and PyTorch), `p ← p − lr·r_t/(1−β1^t)·m/(√(v/(1−β2^t)) + ε)`
/// with `r_t = √((ρ_t−4)(ρ_t−2)ρ∞/((ρ∞−4)(ρ∞−2)ρ_t))`, else `p ← p − lr/(1−β1^t)·m`;
/// weight decay is L2.
#[derive(Clone, Copy, Debug)]
pub struct RAdam {
    beta1: f64,
    beta2: f64,
    epsilon: f64,
    /// `lr·r_t/(1−β1^t)`, or `lr/(1−β1^t)` while the variance is not rectified.
    lr_t: f64,
    /// `1/√(1−β2^t)`.
    inv_root_correction: f64,
    rectified: bool,
}

/// RAdam's `r_t` at step `t`, or None while `ρ_t ≤ 5` (the variance is not tractable).
fn radam_rectification(beta2: f64, t: u64) -> Option<f64> {
    let rho_inf = 2.0 / (1.0 - beta2) - 1.0;
    let power = beta2.powf(t as f64);
    let rho_t = rho_inf - 2.0 * t as f64 * power / (1.0 - power);
    (rho_t > 5.0).then(|| {
        (((rho_t - 4.0) * (rho_t - 2.0) * rho_inf) / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t))
            .sqrt()
    })
}

impl Spec<2> for RAdam {
    const SLOTS: [&'static str; 2] = ["m_", "v_"];
    fn at_step(hyper: &Hyper, t: u64) -> RAdam {
        let rectification = radam_rectification(hyper.beta2, t);
        RAdam {
            beta1: hyper.beta1,
            beta2: hyper.beta2,
            epsilon: hyper.epsilon,
            lr_t: hyper.lr * rectification.unwrap_or(1.0) / correction(hyper.beta1, t),
            inv_root_correction: 1.0 / correction(hyper.beta2, t).sqrt(),
            rectified: rectification.is_some(),
        }
    }
}

impl<T: Arith> Update<T, 2> for RAdam {
    #[inline(always)]
    fn element(&self, p0: T, g: f64, [m, v]: &mut [T; 2]) -> T {
        let g: T = of(g);
        *m = of::<T>(self.beta1) * *m + of::<T>(1.0 - self.beta1) * g;
        *v = of::<T>(self.beta2) * *v + of::<T>(1.0 - self.beta2) * g * g;
        let direction = match self.rectified {
            true => *m / (v.sqrt() * of(self.inv_root_correction) + of(self.epsilon)),
            false => *m,
        };
        p0 - of::<T>(self.lr_t) * direction
    }
}

/// AdaBelief (Zhuang et al., 2020, Algorithm 2): `m ← β1·m + (1−β1)·g ;
/// s ← β2·s + (1−β2)·(g−m)² + ε ; p ← p − lr/(1−β1^t)·m/(√(s/(1−β2^t)) + ε) − lr·wd·p`,
/// the weight decay decoupled as in the crate (0.01 unless set).
#[derive(Clone, Copy, Debug)]
pub struct AdaBelief {
    beta1: f64,
    beta2: f64,
    epsilon: f64,
    /// `lr/(1−β1^t)`.
    lr_t: f64,
    /// `1/√(1−β2^t)`.
    inv_root_correction: f64,
    /// `lr·weight_decay`.
    decay: f64,
}

impl Spec<2> for AdaBelief {
    const SLOTS: [&'static str; 2] = ["m_", "s_"];
    fn at_step(hyper: &Hyper, t: u64) -> AdaBelief {
        AdaBelief {
            beta1: hyper.beta1,
            beta2: hyper.beta2,
            epsilon: hyper.epsilon,
            lr_t: hyper.lr / correction(hyper.beta1, t),
            inv_root_correction: 1.0 / correction(hyper.beta2, t).sqrt(),
            decay: hyper.lr * hyper.weight_decay,
        }
    }
    fn l2(_: &Hyper) -> f64 {
        0.0
    }
}

impl<T: Arith> Update<T, 2> for AdaBelief {
    #[inline(always)]
    fn element(&self, p0: T, g: f64, [m, s]: &mut [T; 2]) -> T {
        let g: T = of(g);
        // g − m_t written as β1·(g − m_{t−1}): the same value without the cancellation
        // that, for β1 near 0 (m_t ≈ g), left float32 a few significant digits.
        let surprise = of::<T>(self.beta1) * (g - *m);
        *m = of::<T>(self.beta1) * *m + of::<T>(1.0 - self.beta1) * g;
        *s = of::<T>(self.beta2) * *s
            + of::<T>(1.0 - self.beta2) * surprise * surprise
            + of(self.epsilon);
        let d = s.sqrt() * of(self.inv_root_correction) + of(self.epsilon);
        p0 - of::<T>(self.lr_t) * *m / d - of::<T>(self.decay) * p0
    }
}

/// Lion (Chen et al., 2023), the crate's form: `c = β1·m + (1−β1)·g ;
/// p ← p − lr·(sign(c) + wd·p) ; m ← β2·m + (1−β2)·g`, the weight decay decoupled as in
/// the paper (0 unless set, as `LionConfig`'s).
#[derive(Clone, Copy, Debug)]
pub struct Lion {
    lr: f64,
    beta1: f64,
    beta2: f64,
    weight_decay: f64,
}

impl Spec<1> for Lion {
    const SLOTS: [&'static str; 1] = ["momentum."];
    fn at_step(hyper: &Hyper, _: u64) -> Lion {
        Lion {
            lr: hyper.lr,
            beta1: hyper.beta1,
            beta2: hyper.beta2,
            weight_decay: hyper.weight_decay,
        }
    }
    fn l2(_: &Hyper) -> f64 {
        0.0
    }
}

impl<T: Real> Update<T, 1> for Lion {
    #[inline(always)]
    fn element(&self, p0: T, g: f64, [m]: &mut [T; 1]) -> T {
        let m0 = m.to_f64();
        let c = self.beta1 * m0 + (1.0 - self.beta1) * g;
        // sign(0) = 0, as PyTorch's `sign`; a select of ±1 with c's sign bit vectorises.
        let sign = if c == 0.0 { 0.0 } else { 1f64.copysign(c) };
        *m = of(self.beta2 * m0 + (1.0 - self.beta2) * g);
        let p0 = p0.to_f64();
        of(p0 - self.lr * (sign + self.weight_decay * p0))
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

    #[test]
    fn nadam_closed_form_product_matches_the_running_product() {
        let beta1 = HYPER.beta1;
        let mu = |t: u64| beta1 * (1.0 - 0.5 * 0.96f64.powf(t as f64 * 0.004));
        let mut product = 1.0;
        for t in 1..=3000u64 {
            product *= mu(t);
            let spec = NAdam::at_step(&HYPER, t);
            let gradient_step = HYPER.lr * (1.0 - mu(t)) / (1.0 - product);
            let momentum_step = HYPER.lr * mu(t + 1) / (1.0 - product * mu(t + 1));
            assert!(close(spec.gradient_step, gradient_step), "t={t}");
            assert!(close(spec.momentum_step, momentum_step), "t={t}");
        }
    }

    #[test]
    fn nadam_survives_beta1_zero_and_huge_step_counts() {
        let zero = NAdam::at_step(
            &Hyper {
                beta1: 0.0,
                ..HYPER
            },
            5,
        );
        assert_eq!((zero.gradient_step, zero.momentum_step), (HYPER.lr, 0.0));
        let late = NAdam::at_step(&HYPER, u64::MAX / 2);
        assert!(late.gradient_step.is_finite() && late.momentum_step.is_finite());
        assert!(
            close(late.momentum_step, HYPER.lr * 0.9),
            "{}",
            late.momentum_step
        );
    }

    #[test]
    fn radam_rectifies_once_rho_t_exceeds_five() {
        // β2 = 0.99: ρ∞ = 199; ρ_t passes 5 at t = 6.
        let early = RAdam::at_step(&HYPER, 5);
        assert!(!early.rectified);
        assert!(close(early.lr_t, HYPER.lr / (1.0 - 0.9f64.powf(5.0))));
        let mut s = [0.0f64; 2];
        let p = early.element(1.0, 2.0, &mut s);
        assert_eq!(p, 1.0 - early.lr_t * s[0]);
        assert!(RAdam::at_step(&HYPER, 6).rectified);
        assert!(
            !RAdam::at_step(
                &Hyper {
                    beta2: 0.0,
                    ..HYPER
                },
                1000
            )
            .rectified
        );
    }

    #[test]
    fn lion_moves_by_the_sign_and_decays_decoupled() {
        let lion = Lion::at_step(&HYPER, 1);
        let mut m = [0.5f64];
        let p = lion.element(2.0, -10.0, &mut m);
        // c = 0.45 − 1 < 0.
        assert_eq!(p, 2.0 - 0.01 * (-1.0 + 0.1 * 2.0));
        assert_eq!(m[0], 0.99 * 0.5 + (1.0 - 0.99) * -10.0);
        let mut zero = [0.0f32];
        assert_eq!(
            lion.element(1.0f32, 0.0, &mut zero),
            (1.0 - 0.01 * 0.1) as f32
        );
        assert_eq!(Lion::l2(&HYPER), 0.0);
    }

    #[test]
    fn adabelief_adds_epsilon_to_its_variance_and_decays_decoupled() {
        let spec = AdaBelief::at_step(&HYPER, 1);
        let mut s = [0.0f64; 2];
        let p = spec.element(2.0, 1.5, &mut s);
        let m = (1.0 - 0.9) * 1.5;
        let belief = (1.0 - 0.99) * (1.5 - m) * (1.5 - m) + 1e-8;
        assert_eq!(s[0], m);
        assert!(close(s[1], belief));
        let (c1, c2) = (1.0 - 0.9, 1.0 - 0.99);
        let expected = 2.0 - 0.01 / c1 * m / ((belief / c2).sqrt() + 1e-8) - 0.01 * 0.1 * 2.0;
        assert!(close(p, expected), "{p} {expected}");
        assert_eq!(AdaBelief::l2(&HYPER), 0.0);
        assert_eq!(AdaMax::l2(&HYPER), 0.1);
    }

    #[test]
    fn adamax_takes_the_larger_of_the_decayed_norm_and_the_gradient() {
        let spec = AdaMax::at_step(&HYPER, 2);
        let mut s = [0.2f64, 3.0];
        let p = spec.element(1.0, -0.5, &mut s);
        assert_eq!(s, [0.9 * 0.2 + (1.0 - 0.9) * -0.5, 0.99 * 3.0]);
        let lr_t = 0.01 / (1.0 - 0.81);
        assert!(close(p, 1.0 - lr_t * s[0] / (s[1] + 1e-8)));
    }

    #[test]
    fn adagrad_and_rmsprop_divide_by_the_root_of_their_accumulators() {
        let mut s = [4.0f64];
        let p = Adagrad::at_step(&HYPER, 1).element(1.0, 3.0, &mut s);
        assert_eq!(
            (s[0], p),
            (13.0, 1.0 - 0.01 * 3.0 / (13.0f64.sqrt() + 1e-8))
        );
        let mut v = [4.0f64];
        let p = RmsProp::at_step(&HYPER, 1).element(1.0, 3.0, &mut v);
        let expected_v = 0.99 * 4.0 + (1.0 - 0.99) * 9.0;
        assert_eq!(
            (v[0], p),
            (expected_v, 1.0 - 0.01 * 3.0 / (expected_v.sqrt() + 1e-8))
        );
    }
}
