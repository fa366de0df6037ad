//! The optimizers' native state: what a phase changes lives here, so that the phase's
//! native call can commit it before it returns. A base optimizer's `Engine` holds its
//! spec, hyperparameters, step count and per-parameter slots; SAM's `SamEngine` holds its
//! saved values, what is pending and its call count. The Python classes hold these and
//! the configuration; state dicts are copies made and read here.

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use super::arrays::{self, NameOrder};
use super::driver::EntryCache;
use super::flat::FlatArena;
use super::statedict::StagedTable;
use super::{optimizer_error, OptimizerError};
use crate::claims::Registration;
use crate::phases::{AscentGroup, Clipping};
use crate::specs::{Hyper, Kind};
use crate::state::{Buffer, Data, Table};

/// A base optimizer's native state.
#[pyclass(module = "samopt._core")]
pub struct Engine {
    pub kind: Kind,
    /// The optimizer's hyperparameters, then each parameter group's.
    pub groups: Vec<Hyper>,
    /// `assign(name) -> group`, the Python side's selectors; none without groups.
    pub assign: Option<Py<PyAny>>,
    pub clipping: Clipping,
    /// Steps taken (Adam's `t`), for optimizers that count them.
    pub steps: u64,
    pub table: Table,
    pub order: NameOrder,
    pub cache: EntryCache,
    /// Whether the parameters hold Schedule-Free's average `x` (after `eval`) rather than
    /// the point `y` a step starts from.
    pub averaged: bool,
}

/// The refusal of a call into an optimizer whose previous call has not returned (a
/// gradient function or a Python base re-entering it).
pub fn busy() -> PyErr {
    OptimizerError::new_err((
        "the optimizer is in use by a call that has not returned".to_owned(),
        Option::<String>::None,
    ))
}

/// A state dict's copy of one buffer.
fn export<'py>(py: Python<'py>, buffer: &Buffer, key: &str) -> PyResult<Bound<'py, PyAny>> {
    Ok(match &buffer.data {
        Data::Single(values) => {
            arrays::array_from::<f32>(py, values, &buffer.shape, buffer.fortran, key)?.into_any()
        }
        Data::Double(values) => {
            arrays::array_from::<f64>(py, values, &buffer.shape, buffer.fortran, key)?.into_any()
        }
    })
}

/// Puts every buffer of `table`'s slots into `out`, by name (in name order: `only` is),
/// each under its slot's prefix. With `gather`, an arena and the key its buffers are held
/// under, the buffers of the arena's names go into one array per slot instead,
/// `<prefix><flat_key>`, in the arena's order; false (and `out` half filled) when they
/// cannot (see `FlatArena::join_slots`).
pub fn export_table(
    py: Python<'_>,
    table: &Table,
    prefixes: &[&str],
    only: Option<&[usize]>,
    out: &Bound<'_, PyDict>,
    gather: Option<(&FlatArena, &str)>,
) -> PyResult<bool> {
    // A pending step's entries are in name order already; gathered, only the entries
    // left per name need sorting (most often none).
    let mut chosen: Vec<usize> = match (only, gather) {
        (Some(entries), _) => entries.to_vec(),
        (None, Some(_)) => (0..table.len()).collect(),
        (None, None) => table.sorted(),
    };
    if let Some((arena, flat_key)) = gather {
        let Some(joined) = arena.join_slots(py, table, &mut chosen, prefixes, flat_key)? else {
            return Ok(false);
        };
        for (key, array) in joined {
            out.set_item(key, array)?;
        }
        if only.is_none() {
            chosen.sort_by(|&a, &b| table.entry(a).name.cmp(&table.entry(b).name));
        }
    }
    for index in chosen {
        let entry = table.entry(index);
        for (buffer, prefix) in entry.buffers.iter().zip(prefixes) {
            if let Some(buffer) = buffer {
                let key = format!("{prefix}{}", entry.name);
                out.set_item(&key, export(py, buffer, &key)?)?;
            }
        }
    }
    Ok(true)
}

/// One parameter group's hyperparameters from the Python side's dict.
pub fn hyper_of(group: &Bound<'_, PyDict>) -> PyResult<Hyper> {
    let get = |key: &str| -> PyResult<Bound<'_, PyAny>> {
        group
            .get_item(key)?
            .ok_or_else(|| optimizer_error(key, format!("a parameter group needs '{key}'")))
    };
    // Schedule-Free's own: the other optimizers need not give them.
    let warmup_steps = match group.get_item("warmup_steps")? {
        Some(steps) => steps.extract()?,
        None => 0,
    };
    let weight_sum = match group.get_item("weight_sum")? {
        Some(sum) => sum.extract()?,
        None => 0.0,
    };
    Ok(Hyper {
        lr: get("lr")?.extract()?,
        momentum: get("momentum")?.extract()?,
        beta1: get("beta1")?.extract()?,
        beta2: get("beta2")?.extract()?,
        epsilon: get("epsilon")?.extract()?,
        weight_decay: get("weight_decay")?.extract()?,
        nesterov: get("nesterov")?.extract()?,
        warmup_steps,
        weight_sum,
    })
}

#[pymethods]
impl Engine {
    /// `groups[0]` is the optimizer's own hyperparameters, `groups[i]` those of its
    /// parameter group `i`; `assign(name) -> i` says which group a name is in.
    #[new]
    #[pyo3(signature = (kind, groups, *, clip_value = None, clip_norm = None, assign = None))]
    fn new(
        kind: &str,
        groups: Vec<Bound<'_, PyDict>>,
        clip_value: Option<f64>,
        clip_norm: Option<f64>,
        assign: Option<Py<PyAny>>,
    ) -> PyResult<Engine> {
        let kind = Kind::parse(kind)
            .ok_or_else(|| optimizer_error("kind", format!("unknown optimizer kind {kind:?}")))?;
        let clipping = match (clip_value, clip_norm) {
            (Some(c), _) => Clipping::Value(c),
            (None, Some(c)) => Clipping::Norm(c),
            (None, None) => Clipping::Off,
        };
        let groups = groups.iter().map(hyper_of).collect::<PyResult<Vec<_>>>()?;
        if groups.is_empty() {
            let message = "an optimizer needs its own hyperparameters".to_owned();
            return Err(optimizer_error("groups", message));
        }
        let slots = kind.slots().len();
        Ok(Engine {
            kind,
            groups,
            assign,
            clipping,
            steps: 0,
            table: Table::new(slots),
            order: NameOrder::default(),
            cache: EntryCache::default(),
            averaged: false,
        })
    }

    /// Schedule-Free's `Σ γ_i²` of each group, the optimizer's own first.
    #[getter]
    fn weight_sums(&self) -> Vec<f64> {
        self.groups.iter().map(|g| g.weight_sum).collect()
    }

    #[setter]
    fn set_weight_sums(&mut self, sums: Vec<f64>) -> PyResult<()> {
        if sums.len() != self.groups.len() {
            let message = format!("{} groups need as many weight sums", self.groups.len());
            return Err(optimizer_error("weight_sum", message));
        }
        for (group, sum) in self.groups.iter_mut().zip(sums) {
            group.weight_sum = sum;
        }
        Ok(())
    }

    /// Whether the parameters hold Schedule-Free's average (set by `schedule_free_shift`;
    /// settable for a loaded state).
    #[getter]
    fn averaged(&self) -> bool {
        self.averaged
    }

    #[setter]
    fn set_averaged(&mut self, averaged: bool) {
        self.averaged = averaged;
    }

    /// Each group's learning rate, the optimizer's own first.
    #[getter]
    fn lrs(&self) -> Vec<f64> {
        self.groups.iter().map(|g| g.lr).collect()
    }

    #[setter]
    fn set_lrs(&mut self, lrs: Vec<f64>) -> PyResult<()> {
        super::assign_lrs(&mut self.groups, lrs, |g| &mut g.lr)
    }

    /// Steps taken (Adam's `t`); 0 for optimizers that do not count them.
    #[getter]
    fn steps(&self) -> u64 {
        self.steps
    }

    /// The state-dict prefixes of the per-parameter slots.
    #[getter]
    fn slots(&self) -> Vec<&'static str> {
        self.kind.slots().to_vec()
    }

    /// Copies of the per-parameter state by key, and `t` for optimizers that count steps,
    /// put into `into` when given (a million keys are not inserted twice).
    #[pyo3(signature = (into = None))]
    fn state_dict<'py>(
        &self,
        py: Python<'py>,
        into: Option<Bound<'py, PyDict>>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let out = into.unwrap_or_else(|| PyDict::new(py));
        self.export(py, &out, None)?;
        Ok(out)
    }

    /// `state_dict` into `into` with the state of `arena`'s names joined into its layout's
    /// buffers (`<slot><flat_key>`), straight from the table: no array per name. False
    /// when a slot holds some of the arena's names but not all, or one of another dtype or
    /// shape.
    fn state_dict_gathered(
        &self,
        py: Python<'_>,
        into: Bound<'_, PyDict>,
        arena: PyRef<'_, FlatArena>,
        flat_key: &str,
    ) -> PyResult<bool> {
        self.export(py, &into, Some((&arena, flat_key)))
    }

    /// Replaces the whole state: the step count and, by name, one array per slot (a
    /// table `parse_table` checked and copied).
    fn load(&mut self, steps: u64, entries: &mut StagedTable) -> PyResult<()> {
        let table = entries.take()?;
        if table.slots() != self.kind.slots().len() {
            let message = format!("a state table needs {} slots", self.kind.slots().len());
            return Err(optimizer_error("state", message));
        }
        self.table = table;
        self.steps = steps;
        Ok(())
    }
}

impl Engine {
    fn export(
        &self,
        py: Python<'_>,
        out: &Bound<'_, PyDict>,
        gather: Option<(&FlatArena, &str)>,
    ) -> PyResult<bool> {
        if self.kind.counts_steps() {
            let t = arrays::array_from::<i64>(py, &[self.steps as i64], &[], false, "t")?;
            out.set_item("t", t)?;
        }
        export_table(py, &self.table, self.kind.slots(), None, out, gather)
    }
}

/// What SAM's state holds between calls.
pub struct SamState {
    /// Saved values (slot 0) and, for GSAM, the gradients at the original point (slot 1).
    pub table: Table,
    /// The table entries of the pending first_step's parameters, in name order.
    pub pending: Option<Vec<usize>>,
    /// Read claims on the pending first_step's parameters, until its second phase takes
    /// them over: another call's write to them is refused rather than wiped by the
    /// restore. None when nothing is pending, or for a pending step loaded from a state
    /// dict (it knows no arrays).
    pub pending_claims: Option<Registration>,
    /// GSAM's `‖g0‖`, while pending.
    pub grad0_norm: f64,
    /// `sam_step` calls made (for `interval`).
    pub calls: u64,
}

pub const SAM_SLOTS: [&str; 2] = ["saved_", "grad0_"];

impl SamState {
    fn new() -> SamState {
        SamState {
            table: Table::new(SAM_SLOTS.len()),
            pending: None,
            pending_claims: None,
            grad0_norm: 0.0,
            calls: 0,
        }
    }
}

/// The native state of SamOptimizer and its variants.
#[pyclass(module = "samopt._core")]
pub struct SamEngine {
    /// Whether first_step keeps the gradient (GSAM).
    pub keeps_grad0: bool,
    /// The optimizer's own ascent, then each parameter group's; `rho` is the group's
    /// radius as a multiple of the optimizer's, which each call gives.
    pub groups: Vec<AscentGroup>,
    /// `assign(name) -> group`, the Python side's selectors; none without groups.
    pub assign: Option<Py<PyAny>>,
    pub state: SamState,
    pub order: NameOrder,
    pub cache: EntryCache,
}

/// A SAM state read from a state dict, not yet in force (see `SamEngine.install`).
#[pyclass(module = "samopt._core")]
pub struct StagedSamState(Option<SamState>);

impl SamEngine {
    fn export(
        &self,
        py: Python<'_>,
        out: &Bound<'_, PyDict>,
        gather: Option<(&FlatArena, &str)>,
    ) -> PyResult<bool> {
        let calls = self.state.calls as i64;
        let calls = arrays::array_from::<i64>(py, &[calls], &[], false, "sam_calls")?;
        out.set_item("sam_calls", calls)?;
        let Some(pending) = &self.state.pending else {
            return Ok(true);
        };
        if !export_table(
            py,
            &self.state.table,
            &SAM_SLOTS,
            Some(pending),
            out,
            gather,
        )? {
            return Ok(false);
        }
        if self.keeps_grad0 {
            let norm = &[self.state.grad0_norm];
            out.set_item(
                "grad_norm0",
                arrays::array_from(py, norm, &[], false, "grad_norm0")?,
            )?;
        }
        Ok(true)
    }
}

#[pymethods]
impl SamEngine {
    /// `groups` holds `(rho as a multiple of the optimizer's, adaptive, eta, perturb)` for
    /// the optimizer itself, then for each parameter group.
    #[new]
    #[pyo3(signature = (keeps_grad0, groups, assign = None))]
    fn new(
        keeps_grad0: bool,
        groups: Vec<(f64, bool, f64, bool)>,
        assign: Option<Py<PyAny>>,
    ) -> PyResult<SamEngine> {
        let mut engine = SamEngine {
            keeps_grad0,
            groups: Vec::new(),
            assign,
            state: SamState::new(),
            order: NameOrder::default(),
            cache: EntryCache::default(),
        };
        engine.set_groups(groups)?;
        Ok(engine)
    }

    /// Replaces the groups' ascents (when `adaptive` or `eta` change).
    fn set_groups(&mut self, groups: Vec<(f64, bool, f64, bool)>) -> PyResult<()> {
        if groups.is_empty() {
            return Err(optimizer_error("groups", "SAM needs its own ascent".into()));
        }
        self.groups = groups
            .into_iter()
            .map(|(rho, adaptive, eta, perturb)| AscentGroup {
                rho,
                adaptive,
                eta,
                perturb,
            })
            .collect();
        Ok(())
    }

    /// Whether a first_step has moved the parameters and awaits its second_step.
    #[getter]
    fn pending(&self) -> bool {
        self.state.pending.is_some()
    }

    /// `sam_step` calls made.
    #[getter]
    fn calls(&self) -> u64 {
        self.state.calls
    }

    /// The parameter names of the pending first_step, sorted (empty when none is).
    fn pending_names<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let names = self.state.pending.iter().flatten();
        let mut names: Vec<&str> = names.map(|&e| &*self.state.table.entry(e).name).collect();
        names.sort_unstable();
        PyList::new(py, names)
    }

    /// `sam_calls` and, while pending, `saved_<name>` (and `grad0_<name>`, `grad_norm0`),
    /// put into `into` when given.
    #[pyo3(signature = (into = None))]
    fn state_dict<'py>(
        &self,
        py: Python<'py>,
        into: Option<Bound<'py, PyDict>>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let out = into.unwrap_or_else(|| PyDict::new(py));
        self.export(py, &out, None)?;
        Ok(out)
    }

    /// `state_dict` into `into` with a pending step's saved values (and GSAM's g0) of
    /// `arena`'s names joined into its layout's buffers, as `Engine.state_dict_gathered`.
    fn state_dict_gathered(
        &self,
        py: Python<'_>,
        into: Bound<'_, PyDict>,
        arena: PyRef<'_, FlatArena>,
        flat_key: &str,
    ) -> PyResult<bool> {
        self.export(py, &into, Some((&arena, flat_key)))
    }

    /// A state made of a state dict's values: `pending` holds each pending name's saved
    /// values (and GSAM's g0), checked and copied by `parse_table`.
    fn stage(
        &self,
        calls: u64,
        pending: &mut StagedTable,
        grad0_norm: f64,
    ) -> PyResult<StagedSamState> {
        let table = pending.take()?.widened(SAM_SLOTS.len());
        let entries = table.sorted();
        for &entry in &entries {
            let buffers = &table.entry(entry).buffers;
            if buffers[0].is_none() || (self.keeps_grad0 != buffers[1].is_some()) {
                let name = &table.entry(entry).name;
                return Err(optimizer_error(
                    name,
                    format!("the pending state of '{name}' is incomplete"),
                ));
            }
        }
        Ok(StagedSamState(Some(SamState {
            pending: (!entries.is_empty()).then_some(entries),
            pending_claims: None,
            table,
            grad0_norm,
            calls,
        })))
    }

    /// Puts a staged state in force (it cannot fail: everything was checked and copied),
    /// ending the claims of a pending first_step it replaces.
    fn install(&mut self, staged: &mut StagedSamState) -> PyResult<()> {
        let state = staged
            .0
            .take()
            .ok_or_else(|| optimizer_error("state", "this state was installed already".into()))?;
        self.state = state;
        Ok(())
    }
}
