//! The phase driver: one validated, claimed call over every array of a dict, with the
//! state buffers each phase uses found in the optimizers' native tables (used in place) or
//! allocated, fallibly, before anything is written; the buffers it made go into the tables
//! when the phase commits.

use numpy::Element;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString};

use super::arrays::{
    self, checked_grad, checked_param, claim_of, describe_shape, is_float_dtype, key_text,
    sorted_entries, Float, Key, NameOrder, Order, Source, Target,
};
use super::{non_finite_error, optimizer_error};
use crate::claims::{Holder, Registration};
use crate::norm::NormError;
use crate::parallel::ByDtype;
use crate::state::{self, Buffer, Table};

/// How a phase uses one state stream of a parameter.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Policy {
    /// Optimizer state: zeros when absent, an error when it does not fit the parameter.
    Lazy,
    /// Written before it is read (SAM's saved values in first_step): a buffer of the
    /// parameter's dtype and shape is reused, any other replaced.
    Scratch,
    /// Must be there and fit (SAM's saved values in second_step).
    Required,
}

/// One state stream a phase uses for every parameter: slot `slot` of table `table` of
/// the call, known in a state dict as `prefix` + the parameter's name.
#[derive(Clone, Copy, Debug)]
pub struct Use {
    pub table: usize,
    pub slot: usize,
    pub prefix: &'static str,
    pub policy: Policy,
}

/// Where each sorted parameter name's state is in one table: a call with the same key
/// objects as the last skips looking them up.
#[derive(Default)]
pub struct EntryCache {
    keys: Vec<Py<PyString>>,
    entries: Vec<Option<usize>>,
    generation: u64,
    /// Each name's parameter group, for these keys (asked of `Groups::assign` once).
    groups: Option<Vec<u32>>,
}

impl EntryCache {
    fn resolve(&mut self, names: &[Key<'_>], table: &Table) -> PyResult<Vec<Option<usize>>> {
        let known = self.generation == table.generation()
            && self.keys.len() == names.len()
            && self
                .keys
                .iter()
                .zip(names)
                .all(|(a, b)| a.as_ptr() == b.0.as_ptr());
        if !known {
            let mut entries = Vec::with_capacity(names.len());
            for name in names {
                entries.push(table.find(&key_text(&name.0)?));
            }
            self.keys = names.iter().map(|name| name.0.clone().unbind()).collect();
            self.entries = entries;
            self.generation = table.generation();
            self.groups = None;
        }
        Ok(self.entries.clone())
    }

    /// Each name's group, for the names `resolve` was last given.
    fn groups(&mut self, names: &[Key<'_>], groups: &Groups<'_, '_>) -> PyResult<Vec<u32>> {
        if let Some(known) = &self.groups {
            return Ok(known.clone());
        }
        let mut found = Vec::with_capacity(names.len());
        for name in names {
            found.push(groups.of(name)?);
        }
        self.groups = Some(found.clone());
        Ok(found)
    }

    /// Records entries a commit created, while the cache still describes that call.
    fn learn(&mut self, entries: &[usize], table: &Table) {
        if self.generation == table.generation() && self.entries.len() == entries.len() {
            self.entries = entries.iter().map(|&e| Some(e)).collect();
        }
    }
}

/// An optimizer's parameter groups: `assign(name) -> index` (the Python side's selectors;
/// none: every name is in group 0) and how many there are.
pub struct Groups<'a, 'py> {
    pub assign: Option<&'a Bound<'py, PyAny>>,
    pub count: usize,
}

impl Groups<'_, '_> {
    fn of(&self, name: &Key<'_>) -> PyResult<u32> {
        let Some(assign) = self.assign else {
            return Ok(0);
        };
        let index: usize = assign.call1((&name.0,))?.extract()?;
        if index >= self.count {
            return Err(name.error(|name| {
                format!("parameter '{name}' was assigned group {index}, which does not exist")
            }));
        }
        Ok(index as u32)
    }
}

/// An optimizer's table of state and the cache of where names are in it.
pub struct TableRef<'a> {
    pub table: &'a mut Table,
    pub cache: &'a mut EntryCache,
}

/// The most state streams an entry has: a base optimizer's slots (Prodigy's four), SAM's
/// saved values and GSAM's g0.
const MAX_STATES: usize = 6;

/// Up to `MAX_STATES` values of one entry, without a heap allocation per entry and call.
pub struct Slots<X> {
    items: [Option<X>; MAX_STATES],
    len: usize,
}

impl<X> Slots<X> {
    fn new() -> Self {
        Slots {
            items: std::array::from_fn(|_| None),
            len: 0,
        }
    }

    fn push(&mut self, item: X) {
        self.items[self.len] = Some(item);
        self.len += 1;
    }

    fn iter_mut(&mut self) -> impl Iterator<Item = &mut X> {
        self.items.iter_mut().flatten()
    }
}

/// The values, in the order they were pushed.
impl<X> IntoIterator for Slots<X> {
    type Item = X;
    type IntoIter = std::iter::Flatten<std::array::IntoIter<Option<X>, MAX_STATES>>;

    fn into_iter(self) -> Self::IntoIter {
        self.items.into_iter().flatten()
    }
}

/// A state buffer in a call's hands: the table's own, used in place, or one the call made
/// (zeros, or the old values in the call's layout), put into the table on commit.
pub enum Held<T> {
    /// A table buffer's values. Nothing moves or frees a table's buffers while a call
    /// holds them: the call has the optimizer to itself from `prepare` to its commit or
    /// release, and a table only replaces a buffer when a call puts in one it made.
    InPlace(std::ptr::NonNull<T>, usize),
    Made(Box<[T]>),
}

impl<T> Held<T> {
    fn values(&mut self) -> &mut [T] {
        match self {
            // SAFETY: see `InPlace`; each table buffer is held by one entry of one call.
            Held::InPlace(data, len) => unsafe {
                std::slice::from_raw_parts_mut(data.as_ptr(), *len)
            },
            Held::Made(values) => values,
        }
    }
}

/// Everything one parameter brings to a call, laid out for the kernels.
pub struct Entry<'py, T: Element> {
    /// The parameter's position in the call (its name is `Prepared::names[item]`).
    pub item: usize,
    /// Its parameter group in the call's first table's optimizer.
    pub group: u32,
    pub param: Target<'py, T>,
    pub grad: Option<Source<'py, T>>,
    held: Slots<Held<T>>,
}

impl<T: Element + Copy> Entry<'_, T> {
    /// The kernels' view: parameter, gradient (if the call has one), state buffers in the
    /// order of the phase's uses.
    pub fn lanes(&mut self) -> (&mut [T], Option<&[T]>, Slots<&mut [T]>) {
        let Entry {
            param, grad, held, ..
        } = self;
        let mut states = Slots::new();
        held.iter_mut().for_each(|held| states.push(held.values()));
        (param.slice(), grad.as_ref().map(Source::slice), states)
    }
}

/// A validated call whose memory is claimed and whose state buffers are in hand. It must
/// end in `commit` or `release`, which give the buffers back to the tables.
pub struct Prepared<'py> {
    pub names: Vec<Key<'py>>,
    /// The entries of the float32 and of the float64 parameters, each in name order (built
    /// in place: an entry is a few hundred bytes), and for each name whether it is float32.
    pub singles: Vec<Entry<'py, f32>>,
    pub doubles: Vec<Entry<'py, f64>>,
    pub is_single: Vec<bool>,
    uses: Vec<Use>,
    /// For each table of the call, each name's entry in it (`None`: it has none yet).
    entries: Vec<Vec<Option<usize>>>,
    /// Holds the call's claims until the call has written everything back.
    registration: Option<Registration>,
}

/// The state-dict key of a parameter's stream, for messages.
fn state_key(use_: &Use, key: &Key<'_>) -> String {
    format!("{}{}", use_.prefix, key.text())
}

/// What a call does with one state stream of one parameter, decided before anything is
/// written: the buffer to take, or a new one (zeros, or the old values in the call's
/// layout), or the error that it does not fit.
fn hold<T: Float>(
    use_: &Use,
    existing: Option<&mut Buffer>,
    key: &Key<'_>,
    shape: &[usize],
    order: Order,
) -> PyResult<Held<T>> {
    let zeros = || {
        let len = shape.iter().product();
        state::zeroed::<T>(len).map_err(|error| {
            let key_text = state_key(use_, key);
            super::out_of_memory(&key_text, &format!("state '{key_text}'"), error.bytes)
        })
    };
    let Some(buffer) = existing else {
        if use_.policy == Policy::Required {
            let key = state_key(use_, key);
            return Err(optimizer_error(&key, format!("state '{key}' is missing")));
        }
        return Ok(Held::Made(zeros()?));
    };
    let fits = T::view(&buffer.data).is_some() && arrays::same_shape(&buffer.shape, shape);
    let same_order = buffer.fortran == order.fortran();
    match (fits, use_.policy) {
        (true, _) if same_order || use_.policy == Policy::Scratch => {
            let values = T::view_mut(&mut buffer.data).expect("dtype checked");
            let data = std::ptr::NonNull::new(values.as_mut_ptr()).expect("a slice's pointer");
            Ok(Held::InPlace(data, values.len()))
        }
        (true, _) => {
            // The parameter changed layout since: the state follows it.
            let own = if buffer.fortran { Order::F } else { Order::C };
            let values = T::view(&buffer.data).expect("dtype checked");
            let relaid = order
                .gather(own.view(shape, values), |x| x)
                .map_err(|error| {
                    let key_text = state_key(use_, key);
                    super::out_of_memory(&key_text, &format!("state '{key_text}'"), error.bytes)
                })?;
            Ok(Held::Made(relaid))
        }
        (false, Policy::Scratch) => Ok(Held::Made(zeros()?)),
        (false, _) => {
            let name = key.text();
            let state = state_key(use_, key);
            Err(optimizer_error(
                &state,
                format!(
                    "state '{state}' has dtype {} and shape {} but parameter '{name}' has \
                     dtype {} and shape {}",
                    buffer.data.dtype(),
                    describe_shape(&buffer.shape),
                    T::DTYPE,
                    describe_shape(shape)
                ),
            ))
        }
    }
}

/// Where a call's state buffers come from: its uses, its tables, and each name's entry
/// in each table.
struct States<'a, 't> {
    uses: &'a [Use],
    tables: &'a mut [TableRef<'t>],
    resolved: &'a [Vec<Option<usize>>],
    groups: &'a [u32],
}

/// Appends parameter `item`'s entry: the parameter laid out for the kernels, its gradient,
/// and what the call will hold of its state.
fn build<'py, T: Float>(
    entries: &mut Vec<Entry<'py, T>>,
    item: usize,
    key: &Key<'py>,
    param: Bound<'py, numpy::PyUntypedArray>,
    grad: Option<Bound<'py, numpy::PyUntypedArray>>,
    states: &mut States<'_, '_>,
) -> PyResult<()> {
    let States {
        uses,
        tables,
        resolved,
        groups,
    } = states;
    let order = Order::of(&param);
    let grad = grad
        .map(|g| arrays::gradient_source::<T>(g, key, order))
        .transpose()?;
    let param = arrays::target::<T>(key, param, order)?;
    let mut held = Slots::new();
    for use_ in uses.iter() {
        let table = &mut tables[use_.table].table;
        let existing = resolved[use_.table][item]
            .and_then(|entry| table.entry_mut(entry).buffers[use_.slot].as_mut());
        held.push(hold::<T>(use_, existing, key, param.shape(), order)?);
    }
    entries.push(Entry {
        item,
        group: groups[item],
        param,
        grad,
        held,
    });
    Ok(())
}

/// Something done to every entry of a call, whatever its dtype.
trait Visit {
    fn visit<T: Float>(&mut self, entry: &mut Entry<'_, T>, item: usize);
}

/// On commit, puts the buffers the call made into their tables, and gives scratch space
/// used in place the call's layout; on release, drops what the call made.
struct GiveBack<'a, 't> {
    uses: &'a [Use],
    tables: &'a mut [TableRef<'t>],
    entries: &'a [Vec<Option<usize>>],
    committed: bool,
}

impl Visit for GiveBack<'_, '_> {
    fn visit<T: Float>(&mut self, entry: &mut Entry<'_, T>, item: usize) {
        let shape = entry.param.shape();
        let fortran = entry.param.order().fortran();
        for (k, use_) in self.uses.iter().enumerate() {
            let held = entry.held.items[k].take().expect("one held buffer per use");
            let Some(index) = self.entries[use_.table][item] else {
                continue;
            };
            if !self.committed {
                continue;
            }
            let slot = &mut self.tables[use_.table].table.entry_mut(index).buffers[use_.slot];
            match held {
                Held::InPlace(..) if use_.policy == Policy::Scratch => {
                    slot.as_mut().expect("a buffer held in place").fortran = fortran;
                }
                Held::InPlace(..) => {}
                Held::Made(values) => {
                    *slot = Some(Buffer {
                        data: T::wrap(values),
                        shape: shape.into(),
                        fortran,
                    })
                }
            }
        }
    }
}

/// The claims of the call's parameters, written (again).
struct ClaimParams(Vec<crate::claims::Claim>);

impl Visit for ClaimParams {
    fn visit<T: Float>(&mut self, entry: &mut Entry<'_, T>, item: usize) {
        self.0.push(claim_of(entry.param.array(), true, item));
    }
}

/// The entries of a pending first_step in table `table` of the call, in name order: a
/// second phase must get exactly its parameter names. It takes over the read claims the
/// step holds on them (none for a step loaded from a state dict).
pub struct Pending<'a> {
    pub table: usize,
    pub entries: &'a [usize],
    pub claims: &'a mut Option<Registration>,
}

impl Pending<'_> {
    fn check(
        &self,
        py: Python<'_>,
        names: &[Key<'_>],
        given: &[Option<usize>],
        table: &Table,
    ) -> PyResult<()> {
        let pending = self.entries;
        if given.len() == pending.len() && given.iter().zip(pending).all(|(g, p)| *g == Some(*p)) {
            return Ok(());
        }
        let mut missing: Vec<&str> = pending
            .iter()
            .filter(|&&e| !given.contains(&Some(e)))
            .map(|&e| &*table.entry(e).name)
            .collect();
        missing.sort_unstable();
        let unexpected: Vec<&Key<'_>> = names
            .iter()
            .zip(given)
            .filter(|(_, g)| g.is_none_or(|g| !pending.contains(&g)))
            .map(|(key, _)| key)
            .collect();
        let shown = |names: Vec<Bound<'_, PyString>>| -> PyResult<String> {
            Ok(pyo3::types::PyList::new(py, names)?.repr()?.to_string())
        };
        let missing_shown = shown(missing.iter().map(|n| PyString::new(py, n)).collect())?;
        let unexpected_shown = shown(unexpected.iter().map(|k| k.0.clone()).collect())?;
        let first = match (missing.first(), unexpected.first()) {
            (Some(name), _) => name.to_string(),
            (None, Some(key)) => key.text(),
            (None, None) => String::new(),
        };
        Err(optimizer_error(
            &first,
            format!(
                "second_step must get the same parameter names as the pending first_step: \
                 missing {missing_shown}, unexpected {unexpected_shown}"
            ),
        ))
    }
}

/// Stage 1: validates everything a call touches, claims its memory and takes or makes
/// every state buffer it uses, writing nothing of the caller's and changing no table
/// unless everything succeeded.
pub fn prepare<'py>(
    params: &Bound<'py, PyDict>,
    order: Option<&mut NameOrder>,
    grads: Option<&Bound<'py, PyDict>>,
    tables: &mut [TableRef<'_>],
    uses: &[Use],
    pending: Option<Pending<'_>>,
    groups: &Groups<'_, 'py>,
) -> PyResult<Prepared<'py>> {
    let (names, objects): (Vec<_>, Vec<_>) = sorted_entries(params, order)?.into_iter().unzip();
    let mut resolved = Vec::with_capacity(tables.len());
    for table in tables.iter_mut() {
        resolved.push(table.cache.resolve(&names, table.table)?);
    }
    let group_of = match tables.first_mut() {
        Some(table) if groups.assign.is_some() => table.cache.groups(&names, groups)?,
        _ => vec![0; names.len()],
    };
    if let Some(pending) = &pending {
        let table = &*tables[pending.table].table;
        pending.check(params.py(), &names, &resolved[pending.table], table)?;
    }
    let mut pending_claims = pending.map(|pending| pending.claims);
    let mut claims = Vec::with_capacity(2 * params.len());
    let mut param_arrays = Vec::with_capacity(params.len());
    for (item, (key, object)) in names.iter().zip(objects).enumerate() {
        let array = checked_param(key, object)?;
        claims.push(claim_of(&array, true, item));
        param_arrays.push(array);
    }
    let n = names.len();
    let mut grad_arrays = Vec::with_capacity(if grads.is_some() { n } else { 0 });
    if let Some(grads) = grads {
        use numpy::PyUntypedArrayMethods;
        for (item, (key, param)) in names.iter().zip(&param_arrays).enumerate() {
            let array = checked_grad(grads, key, param.shape())?;
            claims.push(claim_of(&array, false, n + item));
            grad_arrays.push(array);
        }
    }
    // Nothing of the caller's is read before its memory is claimed.
    let registration = arrays::claim_memory(&names, claims, pending_claims.as_deref_mut())?;
    let mut grad_arrays = grad_arrays.into_iter();
    let n_single = param_arrays
        .iter()
        .filter(|p| is_float_dtype::<f32>(p))
        .count();
    let mut singles = Vec::with_capacity(n_single);
    let mut doubles = Vec::with_capacity(n - n_single);
    let mut is_single = Vec::with_capacity(n);
    let mut states = States {
        uses,
        tables,
        resolved: &resolved,
        groups: &group_of,
    };
    let built = names
        .iter()
        .zip(param_arrays)
        .enumerate()
        .try_for_each(|(item, (key, param))| {
            let grad = grads.and_then(|_| grad_arrays.next());
            let single = is_float_dtype::<f32>(&param);
            is_single.push(single);
            match single {
                true => build(&mut singles, item, key, param, grad, &mut states),
                false => build(&mut doubles, item, key, param, grad, &mut states),
            }
        });
    if let Err(error) = built {
        if let Some(slot) = pending_claims {
            *slot = Some(pending_reads(registration, names.len()));
        }
        return Err(error);
    }
    Ok(Prepared {
        names,
        singles,
        doubles,
        is_single,
        uses: uses.to_vec(),
        entries: resolved,
        registration: Some(registration),
    })
}

/// A call's registration narrowed to read claims of its `params` parameters: what a
/// first_step that is (still) pending holds on them.
fn pending_reads(mut registration: Registration, params: usize) -> Registration {
    registration.narrow_to_reads(|item| item < params, Holder::PendingStep);
    registration
}

impl<'py> Prepared<'py> {
    fn visit(&mut self, visitor: &mut impl Visit) {
        let (mut singles, mut doubles) = (self.singles.iter_mut(), self.doubles.iter_mut());
        for (item, &is_single) in self.is_single.iter().enumerate() {
            match is_single {
                true => visitor.visit(singles.next().expect("one entry per name"), item),
                false => visitor.visit(doubles.next().expect("one entry per name"), item),
            }
        }
    }

    /// Builds one kernel's lanes for every entry, in name order.
    pub fn lanes<'a, S, D>(
        &'a mut self,
        mut single: impl FnMut(&'a mut Entry<'py, f32>) -> S,
        mut double: impl FnMut(&'a mut Entry<'py, f64>) -> D,
    ) -> Vec<ByDtype<S, D>> {
        let mut singles = self.singles.iter_mut();
        let mut doubles = self.doubles.iter_mut();
        let one_of_each = "an entry per name";
        self.is_single
            .iter()
            .map(|&is_single| match is_single {
                true => ByDtype::Single(single(singles.next().expect(one_of_each))),
                false => ByDtype::Double(double(doubles.next().expect(one_of_each))),
            })
            .collect()
    }

    /// Ends the call as if it had not happened: the tables are as they were.
    pub fn release(&mut self, tables: &mut [TableRef<'_>]) {
        self.give_back(tables, false);
    }

    /// Stage 3: writes staged parameters back and puts every buffer into its table as the
    /// kernels left it, creating the entries of names seen for the first time. Returns,
    /// for each table, each name's entry in it.
    pub fn commit(&mut self, tables: &mut [TableRef<'_>]) -> Vec<Vec<usize>> {
        self.write_back();
        self.give_back(tables, true)
    }

    /// Writes the parameters that had to be staged back into their arrays.
    pub fn write_back(&mut self) {
        self.singles.iter_mut().for_each(|e| e.param.write_back());
        self.doubles.iter_mut().for_each(|e| e.param.write_back());
    }

    fn give_back(&mut self, tables: &mut [TableRef<'_>], committed: bool) -> Vec<Vec<usize>> {
        // On commit, names seen for the first time get their entries (and the tables'
        // caches learn them).
        let mut entries = std::mem::take(&mut self.entries);
        let mut created = vec![false; tables.len()];
        if committed {
            for (t, table) in tables.iter_mut().enumerate() {
                if !self.uses.iter().any(|u| u.table == t) {
                    continue;
                }
                for (key, entry) in self.names.iter().zip(entries[t].iter_mut()) {
                    if entry.is_none() {
                        *entry = Some(table.table.entry_for(&key.text()));
                        created[t] = true;
                    }
                }
            }
        }
        let uses = std::mem::take(&mut self.uses);
        self.visit(&mut GiveBack {
            uses: &uses,
            tables,
            entries: &entries,
            committed,
        });
        let lists = entries
            .into_iter()
            .zip(tables.iter_mut())
            .zip(created)
            .map(|((list, table), created)| {
                let list: Vec<usize> = list.into_iter().map(|e| e.unwrap_or(usize::MAX)).collect();
                if created {
                    table.cache.learn(&list, table.table);
                }
                list
            })
            .collect();
        self.uses = uses;
        lists
    }

    /// Ends the call keeping read claims on its parameters, for the first_step it leaves
    /// pending: another optimizer's write to them is refused until that step ends.
    pub fn pending_claims(&mut self) -> Option<Registration> {
        let registration = self.registration.take()?;
        Some(pending_reads(registration, self.names.len()))
    }

    /// Ends the call's claim on its arrays (before a base written in Python runs on them).
    pub fn unclaim(&mut self) {
        self.registration = None;
    }

    /// Claims the parameters again, after `unclaim`.
    pub fn reclaim(&mut self) -> PyResult<()> {
        let mut claims = ClaimParams(Vec::with_capacity(self.names.len()));
        self.visit(&mut claims);
        self.registration = Some(arrays::claim_memory(&self.names, claims.0, None)?);
        Ok(())
    }

    pub fn norm_error(&self, error: NormError) -> PyErr {
        match error {
            NormError::NonFiniteGradient(index) => {
                let name = self.names[index].text();
                non_finite_error(&name, format!("gradient '{name}' contains NaN or infinity"))
            }
            NormError::NonFiniteParameter(index) => self.names[index]
                .error(|name| format!("parameter '{name}' contains NaN or infinity")),
        }
    }
}
