//! One optimizer phase over every array of a call: the read pass that must succeed before
//! anything is written (finite gradients, the norms a phase scales by), then one fused
//! write pass, parallel over fixed chunks spanning all arrays. Pure Rust: the binding
//! layer lays out the arrays and commits the results.

use crate::float::WideFactor;
use crate::kernels::{
    self, Ascent, Clip, CombineLanes, CopyLanes, GradientPlan, GroupStep, Mix, MixLanes,
    PerturbLanes, RestoreKeepingLanes, UpdateLanes,
};
use crate::norm::{self, DotItem, NormError, NormItem};
use crate::parallel::{for_each, ByDtype};
use crate::specs::Spec;

pub type UpdateItem<'a, const N: usize> = ByDtype<UpdateLanes<'a, f32, N>, UpdateLanes<'a, f64, N>>;
pub type PerturbItem<'a> = ByDtype<PerturbLanes<'a, f32>, PerturbLanes<'a, f64>>;
pub type CopyItem<'a> = ByDtype<CopyLanes<'a, f32>, CopyLanes<'a, f64>>;
pub type CombineItem<'a> = ByDtype<CombineLanes<'a, f32>, CombineLanes<'a, f64>>;
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
pub trait WithGradient<T> {
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
    let n1 = norm::global_norm_parts(&gradient_items(items))?;
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
pub fn plan_update<S: WithGradient<f32>, D: WithGradient<f64>>(
    items: &[ByDtype<S, D>],
    clipping: Clipping,
    gsam: Option<GsamInputs>,
) -> Result<GradientPlan, NormError> {
    let (mix, norm) = match (gsam, clipping) {
        (Some(gsam), _) => plan_mix(items, gsam)?,
        (None, Clipping::Norm(_)) => (Mix::PLAIN, norm::global_norm(&gradient_items(items))?),
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

/// `plan_update`'s plan when it needs no global norm (neither norm clipping nor GSAM), for
/// a caller whose own read pass notices a non-finite gradient and then calls
/// `check_gradients` before writing anything: one pass over the gradients fewer.
pub fn plan_unread(clipping: Clipping, gsam: Option<GsamInputs>) -> Option<GradientPlan> {
    let clip = match (clipping, gsam) {
        (Clipping::Off, None) => Clip::OFF,
        (Clipping::Value(c), None) => Clip::value(c),
        _ => return None,
    };
    Some(GradientPlan {
        mix: Mix::PLAIN,
        clip,
    })
}

/// The finiteness check of `plan_update`: the error names the first non-finite gradient.
pub fn check_gradients<S: WithGradient<f32>, D: WithGradient<f64>>(
    items: &[ByDtype<S, D>],
) -> Result<(), NormError> {
    norm::check_finite(&gradient_items(items))
}

/// One step of the base optimizer over every item, each with its group's spec. Clipping
/// and GSAM's mix are global: the norms they need run over every item.
pub fn base_step<S: Spec<N>, const N: usize>(
    items: Vec<UpdateItem<'_, N>>,
    groups: &[GroupStep<S>],
    clipping: Clipping,
    gsam: Option<GsamInputs>,
) -> Result<(), NormError> {
    let plan = plan_update(&items, clipping, gsam)?;
    for_each(items, |piece| match piece {
        ByDtype::Single(lanes) => kernels::update(lanes, groups, plan),
        ByDtype::Double(lanes) => kernels::update(lanes, groups, plan),
    });
    Ok(())
}

/// SAM's ascent for one parameter group (davda54/sam's groups): its radius as a multiple
/// of the optimizer's (so a rho schedule scales every group), whether it is adaptive and
/// with which eta, and whether it is perturbed at all.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AscentGroup {
    pub rho: f64,
    pub adaptive: bool,
    pub eta: f64,
    pub perturb: bool,
}

fn ascent_group<'g>(item: &PerturbItem<'_>, groups: &'g [AscentGroup]) -> &'g AscentGroup {
    match item {
        ByDtype::Single(l) => &groups[l.4 as usize],
        ByDtype::Double(l) => &groups[l.4 as usize],
    }
}

/// A perturbation item's streams for a norm: its gradient, weighted by its parameter when
/// its group is adaptive (and `weighted`).
fn norm_lanes<'a>(
    item: &'a PerturbItem<'_>,
    groups: &[AscentGroup],
    weighted: bool,
) -> NormItem<'a> {
    let group = ascent_group(item, groups);
    let adaptive = weighted && group.adaptive;
    match item {
        ByDtype::Single(l) => ByDtype::Single((l.1, adaptive.then_some((&*l.0, group.eta)))),
        ByDtype::Double(l) => ByDtype::Double((l.1, adaptive.then_some((&*l.0, group.eta)))),
    }
}

/// An error about item `i` of a selection, renumbered as the selection's `indices[i]`.
fn renumber(error: NormError, indices: &[usize]) -> NormError {
    match error {
        NormError::NonFiniteGradient(i) => NormError::NonFiniteGradient(indices[i]),
        NormError::NonFiniteParameter(i) => NormError::NonFiniteParameter(indices[i]),
    }
}

/// SAM's first phase: `n = ‖g‖` over the perturbed groups (adaptive groups weighted,
/// `‖T⊙g‖`), then `saved ← p ; p ← p + ρ·g/(n + eps)` (adaptive: `ρ·T²⊙g/(n + eps)`) with
/// each group's `ρ` (`rho` times the group's multiple of it), keeping `g` where the lanes
/// have room for it. Groups left out of the perturbation are only saved. Returns `n`; when
/// it is zero nothing is written.
pub fn perturb(
    items: Vec<PerturbItem<'_>>,
    groups: &[AscentGroup],
    rho: f64,
    eps: f64,
) -> Result<f64, NormError> {
    // The norm runs over the perturbed groups; the gradients of the others must be finite
    // all the same (GSAM keeps them, and a step with them must not be taken).
    let (perturbed, left_out): (Vec<usize>, Vec<usize>) =
        (0..items.len()).partition(|&i| ascent_group(&items[i], groups).perturb);
    let pick = |indices: &[usize], weighted: bool| -> Vec<NormItem<'_>> {
        let lanes = |&i: &usize| norm_lanes(&items[i], groups, weighted);
        indices.iter().map(lanes).collect()
    };
    let parts = norm::global_norm_parts(&pick(&perturbed, true))
        .map_err(|error| renumber(error, &perturbed))?;
    if !left_out.is_empty() {
        norm::check_finite(&pick(&left_out, false)).map_err(|error| renumber(error, &left_out))?;
    }
    let norm = parts.value();
    if parts.mantissa == 0.0 {
        return Ok(0.0);
    }
    let scale = |multiple: f64| {
        let rho = rho * multiple;
        if eps > 0.0 {
            WideFactor::ratio(rho, norm + eps)
        } else {
            WideFactor::ratio_scaled(rho, parts)
        }
    };
    let ascents: Vec<Ascent> = groups
        .iter()
        .map(|g| match (g.perturb, g.adaptive) {
            (false, _) => Ascent::Keep,
            (true, true) => Ascent::Adaptive {
                scale: scale(g.rho),
                eta: g.eta,
            },
            (true, false) => Ascent::Plain {
                scale: scale(g.rho),
            },
        })
        .collect();
    for_each(items, |piece| match piece {
        ByDtype::Single(lanes) => kernels::perturb(lanes, &ascents),
        ByDtype::Double(lanes) => kernels::perturb(lanes, &ascents),
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

/// Gradient accumulation: `dst ← dst + a·src` over every item, once every `src` is
/// checked finite.
pub fn accumulate(items: Vec<CopyItem<'_>>, a: f64) -> Result<(), NormError> {
    let sources: Vec<NormItem<'_>> = items
        .iter()
        .map(|item| match item {
            ByDtype::Single((_, src)) => ByDtype::Single((*src, None)),
            ByDtype::Double((_, src)) => ByDtype::Double((*src, None)),
        })
        .collect();
    norm::check_finite(&sources)?;
    for_each(items, |piece| match piece {
        ByDtype::Single(lanes) => kernels::axpy(lanes, a),
        ByDtype::Double(lanes) => kernels::axpy(lanes, a),
    });
    Ok(())
}

/// `dst ← a·src` for every item.
pub fn scale(items: Vec<CopyItem<'_>>, a: f64) {
    for_each(items, |piece| match piece {
        ByDtype::Single(lanes) => kernels::scale(lanes, a),
        ByDtype::Double(lanes) => kernels::scale(lanes, a),
    });
}

/// `dst ← a·x + b·y` for every item (the caller has checked `x` and `y` finite, or writes
/// a buffer it discards on error).
pub fn combine(items: Vec<CombineItem<'_>>, a: f64, b: f64) {
    for_each(items, |piece| match piece {
        ByDtype::Single(lanes) => kernels::combine(lanes, a, b),
        ByDtype::Double(lanes) => kernels::combine(lanes, a, b),
    });
}

/// Every item set to zero.
pub fn zero(items: Vec<ByDtype<&mut [f32], &mut [f64]>>) {
    for_each(items, |piece| match piece {
        ByDtype::Single(values) => values.fill(0.0),
        ByDtype::Double(values) => values.fill(0.0),
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

/// `(cos, ‖a‖, ‖b‖)` of two gradient sets given as their streams (`a`'s, `b`'s, and the
/// pairs for the dot product); `cos` is 0 when either norm is.
pub fn cosine(
    a: &[NormItem<'_>],
    b: &[NormItem<'_>],
    pairs: &[DotItem<'_>],
) -> Result<(f64, f64, f64), NormError> {
    let na = norm::global_norm_parts(a)?;
    let nb = norm::global_norm(b)?;
    let cos = if na.mantissa > 0.0 && nb > 0.0 {
        norm::normalised_dot(pairs, na, nb)
    } else {
        0.0
    };
    Ok((cos, na.value(), nb))
}

/// `compute_gradient_norm`: the global L2 norm, NaN if any element is NaN, infinity if any
/// is infinite.
pub fn gradient_norm(items: &[NormItem<'_>]) -> f64 {
    match norm::global_norm(items) {
        Ok(norm) => norm,
        Err(_) if norm::any_nan(items) => f64::NAN,
        Err(_) => f64::INFINITY,
    }
}
