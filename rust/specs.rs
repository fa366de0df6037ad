//! Base optimizers as specs: what state each keeps per parameter (its slots, in the
//! parameter's dtype and layout), the scalars each step derives from the hyperparameters
//! and the step count, and the update of one element. The loop that applies a spec to
//! every element, with SAM's restore and GSAM's mix fused in, is `kernels::update`.

use crate::float::Real;
pub use crate::specs_elementwise::{AdaBelief, AdaMax, Adagrad, Lion, NAdam, RAdam, RmsProp};
pub use crate::specs_schedule_free::ScheduleFreeAdamW;

/// The update of one element: the parameter's new value from its value `p0` at the start
/// of the step and its (clipped, mixed) gradient `g`, updating the element's state `s`
/// in place.
pub trait Update<T: Real, const N: usize>: Copy + Send + Sync {
    fn element(&self, p0: T, g: f64, s: &mut [T; N]) -> T;
}

/// The hyperparameters of `OptimizerConfig` that the updates read (one set per parameter
/// group).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Hyper {
    pub lr: f64,
    pub momentum: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub epsilon: f64,
    pub weight_decay: f64,
    pub nesterov: bool,
    /// Schedule-Free's linear warmup of the learning rate (0: none).
    pub warmup_steps: u64,
    /// Schedule-Free's `Σ γ_i²` over the steps taken: scalar state that travels with the
    /// group's hyperparameters (see `Spec::carry`).
    pub weight_sum: f64,
}

/// A base optimizer with `N` state slots per parameter.
pub trait Spec<const N: usize>: Update<f32, N> + Update<f64, N> {
    /// The state-dict key prefix of each slot (the crate's names).
    const SLOTS: [&'static str; N];
    /// The scalars of step `t` (the first step is 1).
    fn at_step(hyper: &Hyper, t: u64) -> Self;
    /// The L2 penalty added to the (clipped) gradient, `g ← g + wd·p` (PyTorch's SGD and
    /// Adam); optimizers that decay the weights otherwise return 0.
    fn l2(hyper: &Hyper) -> f64 {
        hyper.weight_decay
    }
    /// The group's hyperparameters once step `t` is committed, for specs that carry
    /// scalar state in them (Schedule-Free's weight sum); `at_step` is given these.
    fn carry(hyper: &Hyper, _t: u64) -> Hyper {
        *hyper
    }
}

/// SGD with momentum, the crate's form: `v ← μ·v + lr·g ; p ← p − v`; with Nesterov
/// momentum (PyTorch's `nesterov=True` in this form) `p ← p − (lr·g + μ·v)`.
#[derive(Clone, Copy, Debug)]
pub struct Sgd {
    lr: f64,
    momentum: f64,
    nesterov: bool,
}

impl Spec<1> for Sgd {
    const SLOTS: [&'static str; 1] = ["velocity_"];
    fn at_step(hyper: &Hyper, _: u64) -> Sgd {
        Sgd {
            lr: hyper.lr,
            momentum: hyper.momentum,
            nesterov: hyper.nesterov,
        }
    }
}

impl<T: Real> Update<T, 1> for Sgd {
    /// Computed in f64 and rounded once on store.
    #[inline(always)]
    fn element(&self, p0: T, g: f64, [v]: &mut [T; 1]) -> T {
        let velocity = self.momentum * v.to_f64() + self.lr * g;
        *v = T::from_f64(velocity);
        let step = match self.nesterov {
            true => self.lr * g + self.momentum * velocity,
            false => velocity,
        };
        T::from_f64(p0.to_f64() - step)
    }
}

/// Adam (Kingma & Ba, 2015) in the crate's form, the bias corrections folded into the
/// step size: `lr_t = lr·√(1−β2^t)/(1−β1^t) ; m ← β1·m + (1−β1)·g ;
/// v ← β2·v + (1−β2)·g² ; p ← p − lr_t·m/(√v + ε)`. With `DECOUPLED` it is AdamW
/// (Loshchilov & Hutter, 2019): then `− lr·wd·p` with the step's starting value.
#[derive(Clone, Copy, Debug)]
pub struct Adam<const DECOUPLED: bool> {
    lr_t: f64,
    beta1: f64,
    beta2: f64,
    epsilon: f64,
    /// `lr·weight_decay` for AdamW, 0 for Adam.
    decay: f64,
}

impl<const DECOUPLED: bool> Spec<2> for Adam<DECOUPLED> {
    const SLOTS: [&'static str; 2] = ["m_", "v_"];
    fn at_step(hyper: &Hyper, t: u64) -> Self {
        // `powf` is the C library's `pow`, as Python's `**` on floats.
        let power = t as f64;
        let correction = (1.0 - hyper.beta2.powf(power)).sqrt() / (1.0 - hyper.beta1.powf(power));
        Adam {
            lr_t: hyper.lr * correction,
            beta1: hyper.beta1,
            beta2: hyper.beta2,
            epsilon: hyper.epsilon,
            decay: if DECOUPLED {
                hyper.lr * hyper.weight_decay
            } else {
                0.0
            },
        }
    }
    fn l2(hyper: &Hyper) -> f64 {
        if DECOUPLED {
            0.0
        } else {
            hyper.weight_decay
        }
    }
}

impl<const DECOUPLED: bool> Update<f64, 2> for Adam<DECOUPLED> {
    #[inline(always)]
    fn element(&self, p0: f64, g: f64, [m, v]: &mut [f64; 2]) -> f64 {
        *m = self.beta1 * *m + (1.0 - self.beta1) * g;
        *v = self.beta2 * *v + (1.0 - self.beta2) * g * g;
        p0 - self.lr_t * *m / (v.sqrt() + self.epsilon) - self.decay * p0
    }
}

impl<const DECOUPLED: bool> Update<f32, 2> for Adam<DECOUPLED> {
    /// Computed in f32, as PyTorch does: in f64 the square root and the division made the
    /// kernel compute-bound on float32 data.
    #[inline(always)]
    fn element(&self, p0: f32, g: f64, [m, v]: &mut [f32; 2]) -> f32 {
        let g = g as f32;
        let (b1, b2) = (self.beta1 as f32, self.beta2 as f32);
        let (c1, c2) = ((1.0 - self.beta1) as f32, (1.0 - self.beta2) as f32);
        *m = b1 * *m + c1 * g;
        *v = b2 * *v + c2 * g * g;
        p0 - self.lr_t as f32 * *m / (v.sqrt() + self.epsilon as f32) - self.decay as f32 * p0
    }
}

/// The base optimizers the engine runs, by the name the Python layer gives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Sgd,
    Adam,
    AdamW,
    Adagrad,
    RmsProp,
    NAdam,
    AdaMax,
    RAdam,
    AdaBelief,
    Lion,
    ScheduleFreeAdamW,
}

impl Kind {
    pub fn parse(name: &str) -> Option<Kind> {
        match name {
            "sgd" => Some(Kind::Sgd),
            "adam" => Some(Kind::Adam),
            "adamw" => Some(Kind::AdamW),
            "adagrad" => Some(Kind::Adagrad),
            "rmsprop" => Some(Kind::RmsProp),
            "nadam" => Some(Kind::NAdam),
            "adamax" => Some(Kind::AdaMax),
            "radam" => Some(Kind::RAdam),
            "adabelief" => Some(Kind::AdaBelief),
            "lion" => Some(Kind::Lion),
            "schedule_free_adamw" => Some(Kind::ScheduleFreeAdamW),
            _ => None,
        }
    }

    pub fn slots(self) -> &'static [&'static str] {
        match self {
            Kind::Sgd => &Sgd::SLOTS,
            Kind::Adam => &Adam::<false>::SLOTS,
            Kind::AdamW => &Adam::<true>::SLOTS,
            Kind::Adagrad => &Adagrad::SLOTS,
            Kind::RmsProp => &RmsProp::SLOTS,
            Kind::NAdam => &NAdam::SLOTS,
            Kind::AdaMax => &AdaMax::SLOTS,
            Kind::RAdam => &RAdam::SLOTS,
            Kind::AdaBelief => &AdaBelief::SLOTS,
            Kind::Lion => &Lion::SLOTS,
            Kind::ScheduleFreeAdamW => &ScheduleFreeAdamW::SLOTS,
        }
    }

    /// Whether the optimizer counts its steps: the count `t` is then part of its state.
    pub fn counts_steps(self) -> bool {
        !matches!(self, Kind::Sgd | Kind::Adagrad | Kind::RmsProp | Kind::Lion)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYPER: Hyper = Hyper {
        lr: 0.01,
        momentum: 0.9,
        beta1: 0.9,
        beta2: 0.999,
        epsilon: 1e-8,
        weight_decay: 0.1,
        nesterov: false,
        warmup_steps: 0,
        weight_sum: 0.0,
    };

    #[test]
    fn sgd_matches_the_crate_formula_and_rounds_once_for_f32() {
        let sgd = Sgd::at_step(&HYPER, 1);
        let mut s = [0.5f64];
        let p = sgd.element(2.0, 3.0, &mut s);
        assert_eq!(s[0], 0.9 * 0.5 + 0.01 * 3.0);
        assert_eq!(p, 2.0 - s[0]);
        let one = Sgd {
            lr: 1.0,
            momentum: 0.0,
            nesterov: false,
        };
        let mut v = [0.0f32];
        let p = one.element(1.0f32, f64::from(1.0e-8f32), &mut v);
        assert_eq!(p, (1.0f64 - f64::from(1.0e-8f32)) as f32);
    }

    #[test]
    fn nesterov_steps_with_the_gradient_and_the_new_velocity() {
        let sgd = Sgd::at_step(
            &Hyper {
                nesterov: true,
                ..HYPER
            },
            1,
        );
        let mut s = [0.5f64];
        let p = sgd.element(2.0, 3.0, &mut s);
        let v = 0.9 * 0.5 + 0.01 * 3.0;
        assert_eq!(s[0], v);
        assert_eq!(p, 2.0 - (0.01 * 3.0 + 0.9 * v));
        assert_eq!(Sgd::l2(&HYPER), 0.1);
        assert_eq!(
            (Adam::<false>::l2(&HYPER), Adam::<true>::l2(&HYPER)),
            (0.1, 0.0)
        );
    }

    #[test]
    fn adamw_matches_its_formula_adam_has_no_decay() {
        let (lr, wd, b1, b2, eps) = (0.01, 0.1, 0.9, 0.999, 1e-8);
        let lr_t = lr * (1.0f64 - b2).sqrt() / (1.0 - b1);
        let mut s = [0.0f64; 2];
        let p = Adam::<true>::at_step(&HYPER, 1).element(2.0, 1.5, &mut s);
        let (m1, v1) = ((1.0 - b1) * 1.5, (1.0 - b2) * 1.5 * 1.5);
        assert_eq!(s, [m1, v1]);
        let expected = 2.0 - lr_t * m1 / (v1.sqrt() + eps) - lr * wd * 2.0;
        assert!((p - expected).abs() <= 1e-15 * expected.abs());
        let mut s = [0.0f64; 2];
        let plain = Adam::<false>::at_step(&HYPER, 1).element(2.0, 1.5, &mut s);
        assert!((plain - (expected + lr * wd * 2.0)).abs() <= 1e-15);
    }

    #[test]
    fn bias_corrections_reach_one_for_huge_step_counts() {
        let late = Adam::<false>::at_step(&HYPER, u64::MAX);
        assert_eq!(late.lr_t, HYPER.lr);
    }

    #[test]
    fn kinds_name_their_slots() {
        assert_eq!(Kind::parse("adamw"), Some(Kind::AdamW));
        assert_eq!(Kind::parse("adadelta"), None);
        assert_eq!(Kind::parse("lion"), Some(Kind::Lion));
        assert_eq!(Kind::Lion.slots(), ["momentum."]);
        assert!(Kind::AdaMax.counts_steps() && !Kind::Adagrad.counts_steps());
        assert_eq!(Kind::Sgd.slots(), ["velocity_"]);
        assert_eq!(Kind::Adam.slots(), ["m_", "v_"]);
        assert!(Kind::Adam.counts_steps() && !Kind::Sgd.counts_steps());
    }
}
