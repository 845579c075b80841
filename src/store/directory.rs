//! What the store keeps in memory to find a place in the log without a
//! range lookup in sled (each of which copies the whole leaf it lands in):
//! where each name's newest chunks start, end and lie, and the first seq
//! of each of the newest logged milliseconds.
//!
//! Every list holds the newest entries of its table, all of them from its
//! first entry on: a lookup at or past that entry is answered here, and
//! one before it goes to sled. A list can also lag its table by the commit
//! being applied, whose seqs are not visible yet, so the chunk after the
//! last one listed, and a millisecond past the last, are looked up in
//! sled too. The chunk holding a visible seq is always listed by then
//! (and a cursor handed an older one reads on to it).
//!
//! The lists start empty when the store opens. The commit adds its chunks
//! and milliseconds before its seqs become visible; retention removes what
//! it trimmed. Past the budget, the oldest entries go first, whatever
//! their name or table: the same order retention follows. What was logged
//! before the store opened is added in the background, a commit at a time
//! from the newest back, in front of what commits added since
//! ([`Directory::add_older`]), until the budget is reached: reading the
//! index at open to fill the lists would delay every start.
//!
//! The lists also know the seq past which every chunk is listed, so they
//! can say that a name has nothing past a seq (a subscription's name with
//! nothing new, at every pull) without a look in sled.

use std::collections::{HashMap, VecDeque};
use std::mem::size_of;
use std::sync::{Arc, RwLock};

/// The in-memory lists, with values `V` (a chunk's location and offsets).
pub(super) struct Directory<V> {
    lists: RwLock<Lists<V>>,
    /// The most bytes the lists may take, about.
    budget: usize,
}

struct Lists<V> {
    /// Each name's chunks by first seq, oldest first.
    chunks: HashMap<Arc<str>, VecDeque<Listed<V>>>,
    /// Every chunk listed, oldest first: the order they are dropped in,
    /// and the order of first seqs (a commit lists its chunks so).
    order: VecDeque<Ordered>,
    /// Each logged millisecond with the first seq logged at it, oldest
    /// first.
    times: VecDeque<(u64, u64)>,
    /// What the lists take, about.
    bytes: usize,
    /// Whether older entries may still go in front: not once something
    /// was dropped for the budget, or a fill was refused.
    filling: bool,
    /// The last seq retention removed through.
    forgotten: u64,
    /// Every chunk holding a seq past this one is listed: what the store
    /// logged before it opened and the fill has not reached, and what was
    /// dropped for the budget or by retention, lie at or before it.
    complete_after: u64,
}

/// What the lists know of where a name's events from a seq on start.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Found<V> {
    /// In the chunk that starts at this seq and has this value.
    Chunk(u64, V),
    /// The name has no events there.
    Nowhere,
    /// The lists cannot tell.
    Unknown,
}

/// A chunk in the order of all of them.
struct Ordered {
    first: u64,
    last: u64,
    name: Arc<str>,
}

/// A chunk in its name's list.
struct Listed<V> {
    first: u64,
    last: u64,
    value: V,
}

/// Bytes a name's list takes besides its entries.
const NAME_COST: usize = 64;
/// Bytes a millisecond's entry takes.
const TIME_COST: usize = size_of::<(u64, u64)>();

/// Bytes a chunk's entry takes: in its name's list, in the order, and its
/// value.
fn chunk_cost<V: AsRef<[u8]>>(value: &V) -> usize {
    size_of::<Listed<V>>() + size_of::<Ordered>() + value.as_ref().len()
}

impl<V: Clone + AsRef<[u8]>> Directory<V> {
    /// An empty directory that takes about `budget` bytes at most, for a
    /// log whose seqs up to `logged` were logged before it.
    pub fn new(budget: usize, logged: u64) -> Self {
        Self {
            lists: RwLock::new(Lists {
                chunks: HashMap::new(),
                order: VecDeque::new(),
                times: VecDeque::new(),
                bytes: 0,
                filling: true,
                forgotten: 0,
                complete_after: logged,
            }),
            budget,
        }
    }

    /// Where `name`'s events from `seq` on start: in the chunk holding
    /// `seq` (the last one starting at or before it), nowhere (every chunk
    /// past `seq - 1` is listed, and none of `name`'s), or unknown to the
    /// lists.
    pub fn events_from(&self, name: &str, seq: u64) -> Found<V> {
        let lists = self.lists.read().expect("directory lock is never poisoned");
        let list = lists.chunks.get(name);
        let newest = list
            .and_then(VecDeque::back)
            .map_or(0, |newest| newest.last);
        if lists.complete_after < seq && newest < seq {
            return Found::Nowhere;
        }
        match list.and_then(|list| holding(list, seq)) {
            Some(chunk) => Found::Chunk(chunk.first, chunk.value.clone()),
            None => Found::Unknown,
        }
    }

    /// The chunk of `name` that holds `seq`: the last one starting at or
    /// before it, when the name's list reaches back that far (what
    /// [`Directory::events_from`] finds, when it looks).
    #[cfg(test)]
    pub fn chunk_holding(&self, name: &str, seq: u64) -> Option<(u64, V)> {
        let lists = self.lists.read().expect("directory lock is never poisoned");
        let chunk = holding(lists.chunks.get(name)?, seq)?;
        Some((chunk.first, chunk.value.clone()))
    }

    /// The last seq of each listed chunk that starts at one of `firsts`
    /// (in increasing order), in that order: `None` for a chunk not
    /// listed.
    ///
    /// A first seq names one chunk (its first event's), so a commit's
    /// chunks are found side by side in the order of all chunks, a walk
    /// over them after one search: where a look in each name's list
    /// misses the cache twice per chunk (the name's entry, then its text)
    /// in a log of many names.
    pub fn chunk_lasts(&self, firsts: &[u64]) -> Vec<Option<u64>> {
        let lists = self.lists.read().expect("directory lock is never poisoned");
        let order = &lists.order;
        // Past every chunk that starts before the lowest.
        let mut at = (firsts.first().and_then(|lowest| lowest.checked_sub(1)))
            .map_or(0, |before| at_or_below(order, before, |c| c.first));
        firsts
            .iter()
            .map(|&first| {
                while order.get(at).is_some_and(|c| c.first < first) {
                    at += 1;
                }
                order.get(at).filter(|c| c.first == first).map(|c| c.last)
            })
            .collect()
    }

    /// The chunk of `name` after the one starting at `first`, when both
    /// are listed; nowhere when that one is listed, it is the name's last
    /// and a chunk after it would be listed too.
    pub fn chunk_after(&self, name: &str, first: u64) -> Found<V> {
        let lists = self.lists.read().expect("directory lock is never poisoned");
        let Some(list) = lists.chunks.get(name) else {
            return Found::Unknown;
        };
        let at = at_or_below(list, first, |c| c.first);
        let Some(chunk) = at.checked_sub(1).and_then(|i| list.get(i)) else {
            return Found::Unknown;
        };
        if chunk.first != first {
            return Found::Unknown;
        }
        match list.get(at) {
            Some(after) => Found::Chunk(after.first, after.value.clone()),
            // A later chunk holds seqs past this one's last, and so past
            // `complete_after`: it would be listed.
            None if lists.complete_after <= chunk.last => Found::Nowhere,
            None => Found::Unknown,
        }
    }

    /// The first seq logged at or after millisecond `ms`, when the list
    /// reaches back to `ms` and holds a millisecond at or after it.
    pub fn first_seq_from(&self, ms: u64) -> Option<u64> {
        let lists = self.lists.read().expect("directory lock is never poisoned");
        let front = lists.times.front()?.0;
        if front > ms {
            return None;
        }
        // Past every millisecond before `ms`; `front <= ms`, so for `ms`
        // 0 there are none.
        let at = match ms.checked_sub(1) {
            Some(before) => at_or_below(&lists.times, before, |(at, _)| *at),
            None => 0,
        };
        lists.times.get(at).map(|(_, seq)| *seq)
    }

    /// Adds a commit's chunks (name, first seq, last seq, value), in
    /// order of first seq, and milliseconds (ms, first seq), each newer
    /// than all listed, then drops the oldest entries past the budget.
    pub fn add<'a>(
        &self,
        chunks: impl IntoIterator<Item = (&'a str, u64, u64, V)>,
        times: impl IntoIterator<Item = (u64, u64)>,
    ) {
        let mut lists = self
            .lists
            .write()
            .expect("directory lock is never poisoned");
        for (name, first, last, value) in chunks {
            lists.bytes += chunk_cost(&value);
            let (name, list) = lists.list_of(name);
            list.push_back(Listed { first, last, value });
            lists.order.push_back(Ordered { first, last, name });
        }
        for time in times {
            lists.bytes += TIME_COST;
            lists.times.push_back(time);
        }
        while lists.bytes > self.budget && lists.drop_oldest() {
            lists.filling = false;
        }
    }

    /// Adds one commit logged before the store opened, older than every
    /// entry listed: its chunks (name, first seq, last seq, value), and
    /// the milliseconds (ms, first seq) logged from its first seq on that
    /// are older than every millisecond listed. Each list then still holds
    /// the newest entries of its table, from its first on.
    ///
    /// Adds nothing and says `false` when that would not hold or does not
    /// fit: the entries are not older than those listed, retention removed
    /// some of them, the budget has no room for them, or an entry was
    /// dropped for the budget before (the lists no longer reach back to
    /// where the fill stands). No later call adds anything either.
    pub fn add_older(&self, chunks: &[(&str, u64, u64, V)], times: &[(u64, u64)]) -> bool {
        let mut lists = self
            .lists
            .write()
            .expect("directory lock is never poisoned");
        if !lists.filling {
            return false;
        }
        let older = chunks
            .iter()
            .all(|(_, first, ..)| lists.order.front().map_or(true, |c| *first < c.first))
            && times
                .iter()
                .all(|(ms, _)| lists.times.front().map_or(true, |(m, _)| ms < m));
        let kept = chunks
            .iter()
            .map(|(_, first, ..)| *first)
            .chain(times.iter().map(|(_, seq)| *seq))
            .all(|seq| seq > lists.forgotten);
        // Counts a name for each of its chunks: at most a little over.
        let cost: usize = chunks
            .iter()
            .map(|(name, _, _, value)| {
                let new_name = !lists.chunks.contains_key(*name);
                chunk_cost(value) + if new_name { NAME_COST + name.len() } else { 0 }
            })
            .sum::<usize>()
            + TIME_COST * times.len();
        if !older || !kept || lists.bytes + cost > self.budget {
            lists.filling = false;
            return false;
        }
        // The commit's first event starts one of its chunks.
        if let Some(commit_first) = chunks.iter().map(|(_, first, ..)| *first).min() {
            lists.complete_after = lists.complete_after.min(commit_first.saturating_sub(1));
        }
        let mut chunks: Vec<_> = chunks.iter().collect();
        chunks.sort_unstable_by_key(|(_, first, ..)| std::cmp::Reverse(*first));
        for (name, first, last, value) in chunks {
            lists.bytes += chunk_cost(value);
            let (name, list) = lists.list_of(name);
            list.push_front(Listed {
                first: *first,
                last: *last,
                value: value.clone(),
            });
            lists.order.push_front(Ordered {
                first: *first,
                last: *last,
                name,
            });
        }
        let mut times = times.to_vec();
        times.sort_unstable_by_key(|(ms, _)| std::cmp::Reverse(*ms));
        for time in times {
            lists.bytes += TIME_COST;
            lists.times.push_front(time);
        }
        true
    }

    /// Forgets what retention removed: the chunks of commits up to seq
    /// `through`, and the milliseconds whose events all lie at or before
    /// it (`last` is the log's last seq).
    pub fn forget_through(&self, through: u64, last: u64) {
        let mut lists = self
            .lists
            .write()
            .expect("directory lock is never poisoned");
        lists.forgotten = lists.forgotten.max(through);
        while lists.order.front().is_some_and(|c| c.first <= through) {
            lists.drop_oldest_chunk();
        }
        // A millisecond stays while an event logged at it is left: until
        // the next one starts past `through + 1`.
        while !lists.times.is_empty() {
            let next_first = lists.times.get(1).map_or(last + 1, |(_, seq)| *seq);
            if next_first > through + 1 {
                break;
            }
            lists.drop_oldest_time();
        }
    }

    /// Bytes the lists take, about.
    #[cfg(test)]
    pub fn bytes(&self) -> usize {
        self.lists
            .read()
            .expect("directory lock is never poisoned")
            .bytes
    }
}

/// The chunk of `list` that holds `seq`: the last one starting at or
/// before it.
fn holding<V>(list: &VecDeque<Listed<V>>, seq: u64) -> Option<&Listed<V>> {
    let at = at_or_below(list, seq, |c| c.first);
    list.get(at.checked_sub(1)?)
}

/// How many entries of `list`, in increasing order of `key`, have a key at
/// or below `target`.
///
/// It probes first where `target` would lie if the keys were evenly
/// spaced, then gallops from there: the chunk starts and milliseconds of
/// a log written at a steady pace are found in a few neighbouring probes,
/// where a binary search of a large list misses the cache at nearly every
/// probe. Keys spaced unevenly cost at most about twice a binary search.
fn at_or_below<T>(list: &VecDeque<T>, target: u64, key: impl Fn(&T) -> u64) -> usize {
    let (Some(first), Some(last)) = (list.front(), list.back()) else {
        return 0;
    };
    let (low, high) = (key(first), key(last));
    if target < low {
        return 0;
    }
    if target >= high {
        return list.len();
    }
    // Here the list holds two entries or more, and low <= target < high,
    // so the guess falls before the last entry.
    let last = list.len() - 1;
    let share = u128::from(target - low) * last as u128 / u128::from(high - low);
    let guess = usize::try_from(share).unwrap_or(0).min(last - 1);
    // Bracket the answer: key(lo) <= target < key(hi).
    let (mut lo, mut hi) = (guess, guess);
    let mut step = 1;
    if key(&list[guess]) <= target {
        hi = loop {
            let probe = lo + step;
            if probe >= last {
                break last;
            }
            if key(&list[probe]) > target {
                break probe;
            }
            lo = probe;
            step *= 2;
        };
    } else {
        lo = loop {
            let probe = hi.saturating_sub(step);
            if probe == 0 {
                break 0;
            }
            if key(&list[probe]) <= target {
                break probe;
            }
            hi = probe;
            step *= 2;
        };
    }
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if key(&list[mid]) <= target {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    hi
}

impl<V> std::fmt::Debug for Directory<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut out = f.debug_struct("Directory");
        if let Ok(lists) = self.lists.try_read() {
            out.field("names", &lists.chunks.len())
                .field("chunks", &lists.order.len())
                .field("times", &lists.times.len())
                .field("bytes", &lists.bytes);
        }
        out.field("budget", &self.budget).finish()
    }
}

impl<V: AsRef<[u8]>> Lists<V> {
    /// The shared name and chunk list of `name`, made (and counted) when
    /// it has none.
    fn list_of(&mut self, name: &str) -> (Arc<str>, &mut VecDeque<Listed<V>>) {
        let name = match self.chunks.get_key_value(name) {
            Some((name, _)) => name.clone(),
            None => {
                self.bytes += NAME_COST + name.len();
                name.into()
            }
        };
        let list = self.chunks.entry(name.clone()).or_default();
        (name, list)
    }

    /// Drops the oldest entry, chunk or millisecond; `false` when none is
    /// left.
    fn drop_oldest(&mut self) -> bool {
        let chunk = self.order.front().map(|c| c.first);
        let time = self.times.front().map(|(_, seq)| *seq);
        match (chunk, time) {
            (Some(chunk), Some(time)) if time < chunk => self.drop_oldest_time(),
            (Some(_), _) => self.drop_oldest_chunk(),
            (None, Some(_)) => self.drop_oldest_time(),
            (None, None) => return false,
        }
        true
    }

    fn drop_oldest_time(&mut self) {
        if self.times.pop_front().is_some() {
            self.bytes -= TIME_COST;
        }
    }

    fn drop_oldest_chunk(&mut self) {
        let Some(Ordered { first, name, .. }) = self.order.pop_front() else {
            return;
        };
        let Some(list) = self.chunks.get_mut(&name) else {
            return;
        };
        // NOTE: every chunk enters `order` and its name's list together,
        // both in seq order, so the oldest of `order` is its list's first.
        if list.front().is_some_and(|c| c.first == first) {
            if let Some(chunk) = list.pop_front() {
                self.bytes -= chunk_cost(&chunk.value);
                self.complete_after = self.complete_after.max(chunk.last);
            }
        } else {
            // Not expected; were it to happen, the lists would no longer
            // know that nothing lies past a seq.
            self.complete_after = u64::MAX;
        }
        if list.is_empty() {
            self.chunks.remove(&name);
            self.bytes -= NAME_COST + name.len();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Dir = Directory<Vec<u8>>;

    fn value(first: u64) -> Vec<u8> {
        first.to_be_bytes().to_vec()
    }

    /// Chunks of `a` at 10..=12, 20..=24, 30..=30, of `b` at 15..=19,
    /// 25..=27; milliseconds 100 (seq 10), 101 (seq 20), 105 (seq 25).
    fn listed(budget: usize) -> Dir {
        // Seqs up to 9 were logged before the lists started.
        let dir = Dir::new(budget, 9);
        dir.add(
            [("a", 10, 12, value(10)), ("b", 15, 19, value(15))],
            [(100, 10)],
        );
        dir.add(
            [("a", 20, 24, value(20)), ("b", 25, 27, value(25))],
            [(101, 20), (105, 25)],
        );
        dir.add([("a", 30, 30, value(30))], []);
        dir
    }

    fn first(found: Option<(u64, Vec<u8>)>) -> Option<u64> {
        found.map(|(first, value)| {
            assert_eq!(value, self::value(first), "a chunk keeps its value");
            first
        })
    }

    #[test]
    fn lookups_answer_only_from_what_is_listed() {
        let dir = listed(1 << 20);
        assert_eq!(first(dir.chunk_holding("a", 9)), None, "before the list");
        assert_eq!(first(dir.chunk_holding("a", 10)), Some(10));
        assert_eq!(first(dir.chunk_holding("a", 29)), Some(20));
        assert_eq!(first(dir.chunk_holding("a", 1000)), Some(30));
        assert_eq!(first(dir.chunk_holding("b", 24)), Some(15));
        assert_eq!(first(dir.chunk_holding("c", 24)), None, "an unlisted name");

        assert_eq!(dir.chunk_after("a", 10), Found::Chunk(20, value(20)));
        assert_eq!(dir.chunk_after("b", 15), Found::Chunk(25, value(25)));
        assert_eq!(dir.chunk_after("a", 30), Found::Nowhere, "the last one");
        assert_eq!(
            dir.chunk_after("a", 11),
            Found::Unknown,
            "not a chunk's start"
        );
        assert_eq!(dir.chunk_after("c", 10), Found::Unknown, "an unlisted name");

        assert_eq!(
            dir.chunk_lasts(&[9, 10, 11, 15, 25, 30, 31]),
            [None, Some(12), None, Some(19), Some(27), Some(30), None],
            "9 is before the list, 11 no chunk's start, 31 past the list"
        );
        assert_eq!(dir.chunk_lasts(&[30]), [Some(30)], "from the middle");
        assert_eq!(dir.chunk_lasts(&[0, 20]), [None, Some(24)]);
        assert!(dir.chunk_lasts(&[]).is_empty());

        assert_eq!(dir.first_seq_from(99), None, "before the list");
        assert_eq!(dir.first_seq_from(100), Some(10));
        assert_eq!(dir.first_seq_from(102), Some(25));
        assert_eq!(dir.first_seq_from(105), Some(25));
        assert_eq!(dir.first_seq_from(106), None, "past the list");
    }

    #[test]
    fn the_budget_drops_the_oldest_entries_of_any_name_or_table() {
        let whole = listed(1 << 20).bytes();
        // Room for all but about one chunk: the oldest entry goes, which is
        // a's first chunk (seq 10, older than the millisecond at seq 10
        // only by order: a chunk goes first on a tie).
        let dir = listed(whole - 1);
        assert_eq!(first(dir.chunk_holding("a", 15)), None);
        assert_eq!(dir.chunk_lasts(&[10, 20]), [None, Some(24)], "10 dropped");
        assert_eq!(first(dir.chunk_holding("a", 20)), Some(20));
        assert_eq!(first(dir.chunk_holding("b", 15)), Some(15));
        assert!(dir.bytes() < whole);

        // Less room: b's first chunk and the first milliseconds go too,
        // and every name keeps its newest chunks, from one on.
        let dir = listed(whole / 2);
        assert!(dir.bytes() <= whole / 2);
        assert_eq!(first(dir.chunk_holding("b", 20)), None);
        assert_eq!(first(dir.chunk_holding("a", 35)), Some(30));
        assert_eq!(dir.first_seq_from(100), None);
        assert_eq!(dir.first_seq_from(105), Some(25));

        // No room: nothing is listed and every lookup goes to sled.
        let dir = listed(0);
        assert_eq!(dir.bytes(), 0);
        assert_eq!(first(dir.chunk_holding("a", 35)), None);
        assert_eq!(dir.first_seq_from(105), None);
    }

    /// The probe and gallop count what a binary search counts, for keys
    /// spaced evenly, unevenly, in clusters and repeated.
    #[test]
    fn lookups_count_as_a_binary_search_does() {
        let spacings: [fn(u64) -> u64; 5] = [
            |i| 100 + 7 * i,
            |i| i * i * i,
            |i| if i < 30 { i } else { 1_000_000 + i },
            |i| i / 3,
            |i| 1u64 << (i % 64).min(62),
        ];
        for spacing in spacings {
            for len in 0..70 {
                let mut keys: Vec<u64> = (0..len).map(spacing).collect();
                keys.sort_unstable();
                let list: VecDeque<u64> = keys.iter().copied().collect();
                let mut targets: Vec<u64> = keys
                    .iter()
                    .flat_map(|k| [k.saturating_sub(1), *k, k.saturating_add(1)])
                    .collect();
                targets.extend([0, u64::MAX, u64::MAX / 2]);
                for target in targets {
                    assert_eq!(
                        at_or_below(&list, target, |k| *k),
                        keys.partition_point(|k| *k <= target),
                        "{target} in {keys:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn what_was_logged_before_goes_in_front_of_what_is_listed() {
        // Listed since the store opened: chunks from seq 10 on, times from
        // millisecond 100. One older commit (seqs 5 to 9) goes in front.
        let dir = listed(1 << 20);
        assert!(dir.add_older(
            &[("c", 7, 8, value(7)), ("a", 5, 9, value(5))],
            &[(90, 5), (95, 7)]
        ));
        assert_eq!(first(dir.chunk_holding("a", 9)), Some(5));
        assert_eq!(first(dir.chunk_holding("a", 12)), Some(10));
        assert_eq!(dir.chunk_after("a", 5), Found::Chunk(10, value(10)));
        assert_eq!(
            dir.chunk_after("c", 7),
            Found::Nowhere,
            "c's only chunk, with every chunk listed from seq 5 on"
        );
        assert_eq!(
            dir.chunk_lasts(&[5, 7, 10]),
            [Some(9), Some(8), Some(12)],
            "in the order of first seqs, whatever order the commit gave"
        );
        assert_eq!(first(dir.chunk_holding("c", 100)), Some(7));
        assert_eq!(dir.first_seq_from(89), None, "before the list");
        assert_eq!(dir.first_seq_from(91), Some(7));
        assert_eq!(dir.first_seq_from(96), Some(10));

        // What is not older than the front is refused, and then so is
        // every later fill: the lists would no longer be the newest
        // entries of their tables.
        assert!(!dir.add_older(&[("a", 6, 6, value(6))], &[]));
        assert!(!dir.add_older(&[("a", 1, 2, value(1))], &[(80, 1)]));
        assert_eq!(first(dir.chunk_holding("a", 2)), None);
        assert_eq!(dir.first_seq_from(80), None);
    }

    #[test]
    fn a_fill_stops_where_retention_or_the_budget_did() {
        let older = [("a", 5, 9, value(5))];
        let dir = listed(1 << 20);
        dir.forget_through(12, 40);
        assert!(!dir.add_older(&older, &[]), "retention removed it");
        assert_eq!(first(dir.chunk_holding("a", 5)), None);

        let whole = listed(1 << 20).bytes();
        let dir = listed(whole);
        assert!(!dir.add_older(&older, &[]), "no room");
        assert_eq!(dir.bytes(), whole);

        // Something was dropped for the budget: the lists no longer reach
        // back to the fill, even once retention has made room.
        let dir = listed(whole - 1);
        dir.forget_through(29, 40);
        assert!(!dir.add_older(&older, &[]));
        assert_eq!(first(dir.chunk_holding("a", 5)), None);
    }

    /// Whether the lists know that `name` has no events from `seq` on.
    fn nowhere(dir: &Dir, name: &str, seq: u64) -> bool {
        dir.events_from(name, seq) == Found::Nowhere
    }

    #[test]
    fn nothing_from_a_seq_on_is_known_only_where_every_chunk_is_listed() {
        let dir = listed(1 << 20);
        // Seqs up to 9 were logged before: nothing is known before 10.
        assert!(!nowhere(&dir, "c", 9));
        assert!(nowhere(&dir, "c", 10), "never published since");
        assert_eq!(dir.events_from("a", 30), Found::Chunk(30, value(30)));
        assert!(nowhere(&dir, "a", 31));
        assert_eq!(dir.events_from("b", 26), Found::Chunk(25, value(25)));
        assert!(nowhere(&dir, "b", 28));
        assert_eq!(dir.events_from("b", 9), Found::Unknown, "before the list");
        // The fill lists a commit at seqs 5..=9: known from 5 on.
        assert!(dir.add_older(&[("c", 7, 8, value(7)), ("a", 5, 9, value(5))], &[]));
        assert_eq!(dir.events_from("c", 8), Found::Chunk(7, value(7)));
        assert!(nowhere(&dir, "c", 9));
        assert!(nowhere(&dir, "d", 5));
        assert!(!nowhere(&dir, "d", 4));

        // a's first chunk (10..=12) dropped for the budget: known only
        // from 13 on.
        let dir = listed(listed(1 << 20).bytes() - 1);
        assert!(!nowhere(&dir, "c", 12));
        assert!(nowhere(&dir, "c", 13));
        // Retention removed everything through 27.
        dir.forget_through(27, 30);
        assert!(!nowhere(&dir, "a", 28));
        assert!(nowhere(&dir, "b", 28));
    }

    #[test]
    fn retention_forgets_chunks_and_milliseconds_it_removed() {
        let dir = listed(1 << 20);
        // Commits through seq 19 removed: the chunks at 10 and 15 go, and
        // the millisecond at seq 10 (the next one starts at 20).
        dir.forget_through(19, 40);
        assert_eq!(first(dir.chunk_holding("a", 15)), None);
        assert_eq!(first(dir.chunk_holding("a", 25)), Some(20));
        assert_eq!(first(dir.chunk_holding("b", 16)), None);
        assert_eq!(dir.first_seq_from(100), None);
        assert_eq!(dir.first_seq_from(101), Some(20));

        // Through 22: the chunk at 20 goes, but the millisecond at seq 20
        // stays while events logged at it (21..=24) are left, as in sled.
        dir.forget_through(22, 40);
        assert_eq!(first(dir.chunk_holding("a", 25)), None);
        assert_eq!(first(dir.chunk_holding("a", 1000)), Some(30));
        assert_eq!(dir.first_seq_from(101), Some(20));

        dir.forget_through(40, 40);
        assert_eq!(dir.bytes(), 0, "everything removed is forgotten");
        assert_eq!(first(dir.chunk_holding("a", 1000)), None);
        assert_eq!(dir.first_seq_from(105), None);
    }
}
