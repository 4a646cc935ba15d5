//! Stop sequences, matched on the generated text across token boundaries. Text that
//! could be the start of a stop sequence is held back until it is known not to be, so
//! a stop sequence is never emitted, not even in part.
//!
//! Matching runs on the output thread that every request shares, so it is linear in
//! the text: an Aho-Corasick automaton over the stops' bytes, fed each piece once. Its
//! state is the longest suffix of the text so far that is a prefix of some stop, which
//! is exactly what must be held back. (The `aho-corasick` crate finds matches but does
//! not expose that depth, hence this small automaton: at most 16 × 256 trie nodes.)

pub struct StopMatcher {
    automaton: Option<Automaton>,
    state: u32,
    pending: String,
}

pub enum StopOutcome {
    /// Text safe to emit now; generation goes on.
    Continue(String),
    /// A stop sequence matched: emit this text (what preceded it) and finish.
    Stopped(String),
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        let stops: Vec<String> = stops.into_iter().filter(|s| !s.is_empty()).collect();
        Self {
            automaton: (!stops.is_empty()).then(|| Automaton::new(&stops)),
            state: 0,
            pending: String::new(),
        }
    }

    pub fn push(&mut self, text: &str) -> StopOutcome {
        let Some(ac) = &self.automaton else {
            return StopOutcome::Continue(text.to_string());
        };
        let base = self.pending.len();
        self.pending.push_str(text);
        // Every match ends in the new text (an earlier one would have stopped already);
        // of those, the one that starts first wins, as a search of the whole text would.
        let mut first_start: Option<usize> = None;
        for (i, &b) in text.as_bytes().iter().enumerate() {
            self.state = ac.next(self.state, b);
            if let Some(len) = ac.node(self.state).longest_match {
                let start = base + i + 1 - len as usize;
                first_start = Some(first_start.map_or(start, |s: usize| s.min(start)));
            }
        }
        if let Some(at) = first_start {
            let out = self.pending[..at].to_string();
            self.pending.clear();
            self.state = 0;
            return StopOutcome::Stopped(out);
        }
        // A stop starts with a whole character, so the held suffix starts on one too.
        let hold = ac.node(self.state).depth as usize;
        let cut = self.pending.len() - hold;
        let out = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        StopOutcome::Continue(out)
    }

    /// At the end of generation for another reason, what was held back is real output.
    pub fn flush(&mut self) -> String {
        self.state = 0;
        std::mem::take(&mut self.pending)
    }
}

struct Node {
    /// Sorted by byte.
    children: Vec<(u8, u32)>,
    fail: u32,
    /// Length of this node's prefix.
    depth: u32,
    /// The longest stop that ends here (this node's own, or one reached by failure
    /// links), whose start is therefore the earliest.
    longest_match: Option<u32>,
}

struct Automaton {
    nodes: Vec<Node>,
}

impl Automaton {
    fn new(stops: &[String]) -> Self {
        let mut nodes = vec![Node {
            children: Vec::new(),
            fail: 0,
            depth: 0,
            longest_match: None,
        }];
        for stop in stops {
            let mut at = 0u32;
            for &b in stop.as_bytes() {
                let n = &nodes[at as usize];
                at = match n.children.binary_search_by_key(&b, |c| c.0) {
                    Ok(i) => n.children[i].1,
                    Err(i) => {
                        let id = nodes.len() as u32;
                        let depth = n.depth + 1;
                        nodes[at as usize].children.insert(i, (b, id));
                        nodes.push(Node {
                            children: Vec::new(),
                            fail: 0,
                            depth,
                            longest_match: None,
                        });
                        id
                    }
                };
            }
            let n = &mut nodes[at as usize];
            n.longest_match = Some(n.depth);
        }
        let mut ac = Automaton { nodes };
        // Breadth first, so a node's failure target is complete before its children's.
        let mut queue = std::collections::VecDeque::from([0u32]);
        while let Some(u) = queue.pop_front() {
            for (b, v) in ac.nodes[u as usize].children.clone() {
                let fail = if u == 0 {
                    0
                } else {
                    ac.next(ac.nodes[u as usize].fail, b)
                };
                let inherited = ac.nodes[fail as usize].longest_match;
                let v_node = &mut ac.nodes[v as usize];
                v_node.fail = fail;
                v_node.longest_match = v_node.longest_match.or(inherited);
                queue.push_back(v);
            }
        }
        ac
    }

    fn node(&self, id: u32) -> &Node {
        &self.nodes[id as usize]
    }

    fn child(&self, id: u32, b: u8) -> Option<u32> {
        let c = &self.nodes[id as usize].children;
        c.binary_search_by_key(&b, |c| c.0).ok().map(|i| c[i].1)
    }

    /// The state after reading `b`; amortised O(1) over a text (failure links only
    /// ever shorten the matched suffix, which each byte lengthens by at most one).
    fn next(&self, mut state: u32, b: u8) -> u32 {
        loop {
            if let Some(n) = self.child(state, b) {
                return n;
            }
            if state == 0 {
                return 0;
            }
            state = self.nodes[state as usize].fail;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for p in pieces {
            match m.push(p) {
                StopOutcome::Continue(t) => out.push_str(&t),
                StopOutcome::Stopped(t) => {
                    out.push_str(&t);
                    return (out, true);
                }
            }
        }
        out.push_str(&m.flush());
        (out, false)
    }

    #[test]
    fn stop_split_across_tokens_is_never_emitted() {
        assert_eq!(
            run(&["END"], &["hello E", "N", "D more"]),
            ("hello ".into(), true)
        );
    }

    #[test]
    fn false_start_is_released() {
        assert_eq!(
            run(&["END"], &["a E", "Nx", " b"]),
            ("a ENx b".into(), false)
        );
    }

    #[test]
    fn earliest_of_several_stops_wins() {
        assert_eq!(
            run(&["world", "lo"], &["hello world"]),
            ("hel".into(), true)
        );
    }

    #[test]
    fn held_text_flushes_at_the_end() {
        assert_eq!(run(&["ab"], &["xa"]), ("xa".into(), false));
    }

    /// The quadratic matcher this one replaced, kept as the reference for its meaning.
    fn reference(stops: &[String], pieces: &[String]) -> (String, bool) {
        fn longest_suffix_prefix(text: &str, stop: &str) -> usize {
            let max = text.len().min(stop.len().saturating_sub(1));
            (1..=max)
                .rev()
                .find(|&n| {
                    text.is_char_boundary(text.len() - n)
                        && stop.starts_with(&text[text.len() - n..])
                })
                .unwrap_or(0)
        }
        let (mut pending, mut out) = (String::new(), String::new());
        for p in pieces {
            pending.push_str(p);
            if let Some(at) = stops.iter().filter_map(|s| pending.find(s.as_str())).min() {
                out.push_str(&pending[..at]);
                return (out, true);
            }
            let hold = stops
                .iter()
                .map(|s| longest_suffix_prefix(&pending, s))
                .max()
                .unwrap_or(0);
            let cut = pending.len() - hold;
            out.push_str(&pending[..cut]);
            pending.drain(..cut);
        }
        out.push_str(&pending);
        (out, false)
    }

    #[test]
    fn same_answers_as_the_reference_on_random_text() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(18);
        let alphabet = ["a", "b", "ab", "é", "日", " "];
        let word = |rng: &mut rand::rngs::StdRng, max: usize| -> String {
            (0..rng.random_range(1..=max))
                .map(|_| alphabet[rng.random_range(0..alphabet.len())])
                .collect()
        };
        for _ in 0..3000 {
            let stops: Vec<String> = (0..rng.random_range(1..=4))
                .map(|_| word(&mut rng, 4))
                .collect();
            let pieces: Vec<String> = (0..rng.random_range(1..=12))
                .map(|_| word(&mut rng, 3))
                .collect();
            let p: Vec<&str> = pieces.iter().map(String::as_str).collect();
            let s: Vec<&str> = stops.iter().map(String::as_str).collect();
            assert_eq!(
                run(&s, &p),
                reference(&stops, &pieces),
                "stops {stops:?} pieces {pieces:?}"
            );
        }
    }

    /// The bounds' worst case: 16 stops of 256 bytes that share a long prefix, over a
    /// long output that keeps almost matching. Linear: the old matcher took seconds.
    #[test]
    fn long_output_with_many_long_stops() {
        let stops: Vec<String> = (0..16)
            .map(|i| format!("{}{}", "a".repeat(255), char::from(b'b' + i as u8)))
            .collect();
        let mut m = StopMatcher::new(stops);
        let mut out = String::new();
        for _ in 0..20_000 {
            match m.push("aaaa") {
                StopOutcome::Continue(t) => out.push_str(&t),
                StopOutcome::Stopped(_) => panic!("no stop was generated"),
            }
        }
        // 255 `a`s could still begin a stop: held back, the rest emitted.
        assert_eq!(out.len(), 80_000 - 255);
        match m.push("a!") {
            StopOutcome::Continue(t) => out.push_str(&t),
            StopOutcome::Stopped(_) => panic!("! ends no stop"),
        }
        assert_eq!(out.len(), 80_002);
        for _ in 0..64 {
            let _ = m.push("aaaa");
        }
        match m.push("c tail") {
            // The stop starts with the 255 held-back `a`s: nothing more is emitted.
            StopOutcome::Stopped(t) => assert_eq!(t, ""),
            StopOutcome::Continue(t) => panic!("the stop ending in c was missed: {t:?}"),
        }
    }

    #[test]
    fn multibyte_stop() {
        assert_eq!(run(&["é!"], &["café", "!"]), ("caf".into(), true));
        assert_eq!(run(&["日本"], &["x日", "x"]), ("x日x".into(), false));
    }
}
