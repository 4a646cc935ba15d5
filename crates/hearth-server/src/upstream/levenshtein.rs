//! The Levenshtein distance between two texts, on characters, exact, in ⌈m/64⌉·n
//! word steps rather than the textbook table's m·n cells: the bit-parallel algorithm
//! of Myers (1999) as Hyyrö (2003) states it for the edit distance, the shorter text's
//! rows packed 64 to a word, each column of the table advanced a word at a time with
//! the horizontal deltas carried from word to word. On the comparison's longest texts
//! (8192 characters a side) that is ~1 M word steps against ~67 M cells. A common
//! prefix and suffix are cut first (they change nothing), so near-equal outputs, the
//! usual shadowed pair, cost little more than the scan.

use std::collections::HashMap;

/// The edit distance (insertions, deletions, substitutions, each 1) of `a` and `b`.
pub fn distance(a: &[char], b: &[char]) -> usize {
    let prefix = a.iter().zip(b).take_while(|(x, y)| x == y).count();
    let (a, b) = (&a[prefix..], &b[prefix..]);
    let suffix = a
        .iter()
        .rev()
        .zip(b.iter().rev())
        .take_while(|(x, y)| x == y)
        .count();
    let (a, b) = (&a[..a.len() - suffix], &b[..b.len() - suffix]);
    // The shorter one is the pattern (the bit vectors), the other the text.
    let (pattern, text) = if a.len() <= b.len() { (a, b) } else { (b, a) };
    let m = pattern.len();
    if m == 0 {
        return text.len();
    }
    let words = m.div_ceil(64);
    // For each character of the pattern, where it occurs (a bit per row); the first
    // `words` words are every character the pattern lacks (no bit set).
    let mut slot: HashMap<char, usize> = HashMap::new();
    let mut occurs: Vec<u64> = vec![0; words];
    for (row, c) in pattern.iter().enumerate() {
        let next = slot.len() + 1;
        let k = *slot.entry(*c).or_insert(next);
        if k == next {
            occurs.resize((k + 1) * words, 0);
        }
        occurs[k * words + row / 64] |= 1 << (row % 64);
    }
    let last = 1u64 << ((m - 1) % 64);
    // The vertical deltas of the current column: +1 (vp) or -1 (vn), else 0. The
    // first column is 0, 1, .., m: all +1.
    let mut vp = vec![!0u64; words];
    let mut vn = vec![0u64; words];
    let mut dist = m;
    for c in text {
        let k = slot.get(c).copied().unwrap_or(0);
        let eq = &occurs[k * words..(k + 1) * words];
        // Into the top row: the first row of the table counts up (+1).
        let (mut hp_in, mut hn_in) = (1u64, 0u64);
        for (w, ((vp, vn), eq)) in vp.iter_mut().zip(vn.iter_mut()).zip(eq).enumerate() {
            let (p, n) = (*vp, *vn);
            let x = eq | hn_in;
            let d0 = ((x & p).wrapping_add(p) ^ p) | x | n;
            let hp = n | !(d0 | p);
            let hn = d0 & p;
            // Out of this word: its top bit, or the last row's in the last word.
            let (hp_out, hn_out) = if w + 1 < words {
                (hp >> 63, hn >> 63)
            } else {
                (u64::from(hp & last != 0), u64::from(hn & last != 0))
            };
            let hp = (hp << 1) | hp_in;
            let hn = (hn << 1) | hn_in;
            *vp = hn | !(d0 | hp);
            *vn = hp & d0;
            (hp_in, hn_in) = (hp_out, hn_out);
        }
        // The last row's horizontal delta: +1 and -1 never both.
        dist = dist + hp_in as usize - hn_in as usize;
    }
    dist
}

#[cfg(test)]
mod tests {
    use super::distance;

    /// A small deterministic generator (xorshift), for reproducible cases.
    struct Gen(u64);
    impl Gen {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn text(&mut self, len: usize, alphabet: &[char]) -> Vec<char> {
            (0..len)
                .map(|_| alphabet[(self.next() % alphabet.len() as u64) as usize])
                .collect()
        }
    }

    fn oracle(a: &[char], b: &[char]) -> usize {
        let (a, b): (String, String) = (a.iter().collect(), b.iter().collect());
        strsim::levenshtein(&a, &b)
    }

    #[test]
    fn it_is_the_textbook_distance_on_known_pairs() {
        let d = |a: &str, b: &str| {
            distance(
                &a.chars().collect::<Vec<_>>(),
                &b.chars().collect::<Vec<_>>(),
            )
        };
        assert_eq!(d("", ""), 0);
        assert_eq!(d("abc", ""), 3);
        assert_eq!(d("", "abc"), 3);
        assert_eq!(d("kitten", "sitting"), 3);
        assert_eq!(d("flaw", "lawn"), 2);
        assert_eq!(d("héllo wörld", "hello world"), 2);
        assert_eq!(d("abc", "abc"), 0);
    }

    #[test]
    fn it_agrees_with_the_table_across_word_boundaries() {
        let mut g = Gen(0x9e37_79b9_7f4a_7c15);
        let small = ['a', 'b', 'c'];
        let wide = ['a', 'b', 'é', '語', ' ', 'z', 'q', '🙂'];
        // Lengths around 64 and 128 rows, both orders, related and unrelated texts.
        for case in 0..600 {
            let alphabet: &[char] = if case % 2 == 0 { &small } else { &wide };
            let la = (g.next() % 200) as usize;
            let a = g.text(la, alphabet);
            let b = if case % 3 == 0 {
                // An edited copy: the usual shadowed pair.
                let mut b = a.clone();
                for _ in 0..(g.next() % 8) {
                    let at = (g.next() as usize) % (b.len() + 1);
                    match g.next() % 3 {
                        0 => b.insert(at, alphabet[(g.next() % alphabet.len() as u64) as usize]),
                        1 if at < b.len() => {
                            b.remove(at);
                        }
                        _ if at < b.len() => b[at] = 'x',
                        _ => {}
                    }
                }
                b
            } else {
                let lb = (g.next() % 200) as usize;
                g.text(lb, alphabet)
            };
            assert_eq!(distance(&a, &b), oracle(&a, &b), "{a:?} / {b:?}");
            assert_eq!(distance(&b, &a), oracle(&a, &b), "{b:?} / {a:?}");
        }
        for (la, lb) in [
            (64, 64),
            (63, 65),
            (64, 128),
            (129, 1),
            (1, 129),
            (256, 300),
        ] {
            let (a, b) = (g.text(la, &small), g.text(lb, &small));
            assert_eq!(distance(&a, &b), oracle(&a, &b), "{la}x{lb}");
        }
    }
}
