//! One optimizer phase over every array of a call: the read pass that must succeed before
//! anything is written (finite gradients, the norms a phase scales by), then one fused
//! write pass, parallel over fixed chunks spanning all arrays. Pure Rust: the binding
//! layer lays out the arrays and commits the results.

use crate::float::WideFactor;
use crate::kernels::{
    self, Ascent, Clip, CopyLanes, GradientPlan, Mix, MixLanes, PerturbLanes, RestoreKeepingLanes,
    UpdateLanes,
};
use crate::norm::{self, DotItem, NormError, NormItem};
use crate::parallel::{for_each, ByDtype};
use crate::specs::Spec;

pub type UpdateItem<'a, const N: usize> = ByDtype<UpdateLanes<'a, f32, N>, UpdateLanes<'a, f64, N>>;
pub type PerturbItem<'a> = ByDtype<PerturbLanes<'a, f32>, PerturbLanes<'a, f64>>;
pub type CopyItem<'a> = ByDtype<CopyLanes<'a, f32>, CopyLanes<'a, f64>>;
pub type MixItem<'a> = ByDtype<MixLanes<'a, f32>, MixLanes<'a, f64>>;
pub type RestoreKeepingItem<'a> =
    ByDtype<RestoreKeepingLanes<'a, f32>, RestoreKeepingLanes<'a, f64>>;

/// Gradient clipping as `OptimizerConfig` asks for it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Clipping {
    Off,
    /// Clamp each element to `±c`.
    Value(f64),
    /// Scale all gradients by `c/‖g‖` when the global norm `‖g‖` exceeds `c`.
    Norm(f64),
}

/// GSAM's inputs to a second step: alpha and `‖g0‖`, known from the first step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GsamInputs {
    pub alpha: f64,
    pub grad0_norm: f64,
}

/// A gradient stream and, for GSAM, the kept `g0` beside it.
trait WithGradient<T> {
    fn gradient(&self) -> &[T];
    fn reference(&self) -> Option<&[T]>;
}

impl<T, const N: usize> WithGradient<T> for UpdateLanes<'_, T, N> {
    fn gradient(&self) -> &[T] {
        self.grad
    }
    fn reference(&self) -> Option<&[T]> {
        self.grad0
    }
}

impl<T> WithGradient<T> for MixLanes<'_, T> {
    fn gradient(&self) -> &[T] {
        self.1
    }
    fn reference(&self) -> Option<&[T]> {
        Some(self.2)
    }
}

fn gradient_items<S: WithGradient<f32>, D: WithGradient<f64>>(
    items: &[ByDtype<S, D>],
) -> Vec<NormItem<'_>> {
    items
        .iter()
        .map(|item| match item {
            ByDtype::Single(l) => ByDtype::Single((l.gradient(), None)),
            ByDtype::Double(l) => ByDtype::Double((l.gradient(), None)),
        })
        .collect()
}

fn reference_of<T>(lanes: &impl WithGradient<T>) -> &[T] {
    lanes.reference().expect("GSAM lanes carry g0")
}

/// GSAM's mix for these lanes: `‖g1‖` (which also checks g1 finite) and the cosine
/// between g0 and g1 give `a`, `b` and the norm of the mixed gradient.
fn plan_mix<S: WithGradient<f32>, D: WithGradient<f64>>(
    items: &[ByDtype<S, D>],
    gsam: GsamInputs,
) -> Result<(Mix, f64), NormError> {
    let n0 = gsam.grad0_norm;
    let n1 = norm::global_norm_parts(&gradient_items(items), 0.0)?;
    let cos = if n0 > 0.0 && n1.mantissa > 0.0 {
        let pairs: Vec<DotItem<'_>> = items
            .iter()
            .map(|item| match item {
                ByDtype::Single(l) => ByDtype::Single((l.gradient(), reference_of(l))),
                ByDtype::Double(l) => ByDtype::Double((l.gradient(), reference_of(l))),
            })
            .collect();
        norm::normalised_dot(&pairs, n1, n0)
    } else {
        0.0
    };
    let mix = kernels::gsam_mix(gsam.alpha, n0, n1, cos);
    Ok((mix, kernels::mixed_norm(gsam.alpha, n0, n1.value(), cos)))
}

/// Everything that must hold before a base step writes: finite gradients, and the clipping
/// and GSAM mix resolved to per-element constants. Reads the gradients once (twice with
/// GSAM); the global norm is only computed when norm clipping or GSAM needs it.
fn plan_update<S: WithGradient<f32>, D: WithGradient<f64>>(
    items: &[ByDtype<S, D>],
    clipping: Clipping,
    gsam: Option<GsamInputs>,
) -> Result<GradientPlan, NormError> {
    let (mix, norm) = match (gsam, clipping) {
        (Some(gsam), _) => plan_mix(items, gsam)?,
        (None, Clipping::Norm(_)) => (Mix::PLAIN, norm::global_norm(&gradient_items(items), 0.0)?),
        (None, _) => {
            norm::check_finite(&gradient_items(items))?;
            (Mix::PLAIN, f64::NAN)
        }
    };
    let clip = match clipping {
        Clipping::Value(c) => Clip::value(c),
        Clipping::Norm(c) if norm > c => Clip::scale(c / norm),
        _ => Clip::OFF,
    };
    Ok(GradientPlan { mix, clip })
}

/// One step of the base optimizer `spec` over every item.
pub fn base_step<S: Spec<N>, const N: usize>(
    items: Vec<UpdateItem<'_, N>>,
    spec: S,
    clipping: Clipping,
    gsam: Option<GsamInputs>,
) -> Result<(), NormError> {
    let plan = plan_update(&items, clipping, gsam)?;
    for_each(items, |piece| match piece {
        ByDtype::Single(lanes) => kernels::update(lanes, &spec, plan),
        ByDtype::Double(lanes) => kernels::update(lanes, &spec, plan),
    });
    Ok(())
}

/// SAM's ascent as the optimizer is configured.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AscentInputs {
    pub rho: f64,
    pub eps: f64,
    pub adaptive: bool,
    pub eta: f64,
}

/// SAM's first phase: `n = ‖g‖` (adaptive: `‖T⊙g‖`), then `saved ← p ; p ← p + ρ·g/(n +
/// eps)` (adaptive: `ρ·T²⊙g/(n + eps)`), keeping `g` where the lanes have room for it.
/// Returns `n`; when it is zero nothing is written.
pub fn perturb(items: Vec<PerturbItem<'_>>, inputs: AscentInputs) -> Result<f64, NormError> {
    let adaptive = inputs.adaptive;
    let weighted: Vec<NormItem<'_>> = items
        .iter()
        .map(|item| match item {
            ByDtype::Single(l) => ByDtype::Single((l.1, adaptive.then_some(&*l.0))),
            ByDtype::Double(l) => ByDtype::Double((l.1, adaptive.then_some(&*l.0))),
        })
        .collect();
    let parts = norm::global_norm_parts(&weighted, inputs.eta)?;
    let norm = parts.value();
    if parts.mantissa == 0.0 {
        return Ok(0.0);
    }
    let scale = if inputs.eps > 0.0 {
        WideFactor::ratio(inputs.rho, norm + inputs.eps)
    } else {
        WideFactor::ratio_scaled(inputs.rho, parts)
    };
    let ascent = match adaptive {
        true => Ascent::Adaptive {
            scale,
            eta: inputs.eta,
        },
        false => Ascent::Plain { scale },
    };
    for_each(items, |piece| match piece {
        ByDtype::Single(lanes) => kernels::perturb(lanes, &ascent),
        ByDtype::Double(lanes) => kernels::perturb(lanes, &ascent),
    });
    Ok(norm)
}

/// `dst ← src` for every item, bit for bit.
pub fn copy(items: Vec<CopyItem<'_>>) {
    for_each(items, |piece| match piece {
        ByDtype::Single(lanes) => kernels::copy(lanes),
        ByDtype::Double(lanes) => kernels::copy(lanes),
    });
}

/// `kept ← p ; p ← saved` for every item.
pub fn restore_keeping(items: Vec<RestoreKeepingItem<'_>>) {
    for_each(items, |piece| match piece {
        ByDtype::Single(lanes) => kernels::restore_keeping(lanes),
        ByDtype::Double(lanes) => kernels::restore_keeping(lanes),
    });
}

/// GSAM's gradient `g1 − α·g0⊥` written out, for a base optimizer written in Python.
pub fn gsam_direction(items: Vec<MixItem<'_>>, gsam: GsamInputs) -> Result<(), NormError> {
    let (mix, _) = plan_mix(&items, gsam)?;
    for_each(items, |piece| match piece {
        ByDtype::Single(lanes) => kernels::mix_into(lanes, mix),
        ByDtype::Double(lanes) => kernels::mix_into(lanes, mix),
    });
    Ok(())
}

/// `compute_gradient_norm`: the global L2 norm, NaN if any element is NaN, infinity if any
/// is infinite.
pub fn gradient_norm(items: &[NormItem<'_>]) -> f64 {
    match norm::global_norm(items, 0.0) {
        Ok(norm) => norm,
        Err(_) if norm::any_nan(items) => f64::NAN,
        Err(_) => f64::INFINITY,
    }
}
