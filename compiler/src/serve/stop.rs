//! Stop strings over streamed text.
//!
//! OpenAI's `stop` ends a completion at the first occurrence of any of its
//! strings in the generated text, and the stop string itself is not
//! returned. Text arrives a token at a time, so a stop string can straddle
//! several pushes: whatever could still be the start of one is held back
//! until the next push proves it is not (or completes it).

/// Text of one sequence between the detokenizer and the client.
#[derive(Debug, Default)]
pub struct StopText {
    stops: Vec<String>,
    /// Text received but not handed out yet.
    held: String,
}

/// What one push hands out.
#[derive(Debug, PartialEq, Eq)]
pub enum Pushed {
    /// Text that is safe to send now (possibly empty).
    Text(String),
    /// A stop string matched: the text before it; the sequence is over.
    Stopped(String),
}

impl StopText {
    /// Empty strings are ignored (they would match everywhere).
    pub fn new(stops: &[String]) -> Self {
        StopText { stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(), held: String::new() }
    }

    pub fn push(&mut self, text: &str) -> Pushed {
        self.held.push_str(text);
        // Everything before `held` was checked already and held back any
        // start of a stop string, so a match begins inside `held`.
        if let Some(at) = self.stops.iter().filter_map(|s| self.held.find(s.as_str())).min() {
            let before = self.held[..at].to_string();
            self.held.clear();
            return Pushed::Stopped(before);
        }
        let keep = self.stops.iter().map(|s| suffix_starting(&self.held, s)).max().unwrap_or(0);
        let cut = self.held.len() - keep;
        Pushed::Text(self.held.drain(..cut).collect())
    }

    /// The end of the sequence: whatever was held back is text after all.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

/// Length of the longest end of `text` that is a proper start of `stop`.
fn suffix_starting(text: &str, stop: &str) -> usize {
    (1..stop.len()).rev().find(|&k| stop.is_char_boundary(k) && text.ends_with(&stop[..k])).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stops(s: &[&str]) -> StopText {
        StopText::new(&s.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn text_without_stops_passes_straight_through() {
        let mut t = stops(&[]);
        assert_eq!(t.push("Hello"), Pushed::Text("Hello".into()));
        assert_eq!(t.push(" world"), Pushed::Text(" world".into()));
        assert_eq!(t.finish(), "");
    }

    #[test]
    fn a_stop_split_over_pushes_is_held_back_then_cut() {
        let mut t = stops(&["END", "\n\n"]);
        assert_eq!(t.push("one E"), Pushed::Text("one ".into()), "`E` may start END");
        assert_eq!(t.push("N"), Pushed::Text(String::new()));
        assert_eq!(t.push("Dtwo"), Pushed::Stopped("".into()), "the held `EN` + `D` completes END");
        let mut t = stops(&["END"]);
        assert_eq!(t.push("ENTER"), Pushed::Text("ENTER".into()), "a false start is released");
        assert_eq!(t.push("abc\nEN"), Pushed::Text("abc\n".into()));
        assert_eq!(t.finish(), "EN", "held text is returned at the end");
    }

    #[test]
    fn the_earliest_of_several_stops_wins_and_multibyte_text_is_not_split() {
        let mut t = stops(&["世界", "b"]);
        assert_eq!(t.push("a你好世"), Pushed::Text("a你好".into()));
        assert_eq!(t.push("界b"), Pushed::Stopped("".into()));
        let mut t = stops(&["xy", "y"]);
        assert_eq!(t.push("1x"), Pushed::Text("1".into()));
        assert_eq!(t.push("y2"), Pushed::Stopped("".into()), "xy starts before y");
        let mut t = stops(&["", "q"]);
        assert_eq!(t.push("abc"), Pushed::Text("abc".into()), "an empty stop matches nothing");
    }
}
