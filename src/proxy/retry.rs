//! What a failed attempt leads to, and which requests may be replayed (pure: no I/O, no clock).
//!
//! A request is replayed on another backend only when replaying it cannot change anything: an
//! idempotent method, no body (bodies are streamed, never kept for a replay), no upgrade. Only
//! failures *before any answer* are retried (the backend refused, or the connection broke before
//! a response head); a backend that answers, even 5xx, is answered with, and a timeout is a 504,
//! never a replay (the backend may still be acting on it).

use http::{Method, StatusCode};

/// How an attempt failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The client's body broke (bad chunk, early close): the client's fault.
    ClientBody,
    /// The backend could not be reached.
    Connect,
    /// The connection to the backend failed before an answer came.
    Request,
    /// The backend did not answer within `response_timeout`.
    Timeout,
}

impl Fault {
    /// Which side the fault is on, as logs and `fault=` say it.
    pub fn side(self) -> &'static str {
        match self {
            Fault::ClientBody => "downstream",
            _ => "upstream",
        }
    }
}

/// What to do after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Try another backend (if one is left and attempts remain).
    Retry,
    /// Answer the client.
    Answer(Answer),
}

/// A short local answer to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answer {
    /// The status.
    pub status: StatusCode,
    /// A short plain-text body.
    pub text: &'static str,
    /// Whether to close the client connection after it.
    pub close: bool,
}

/// The answer when every attempt failed before a response.
pub const UNAVAILABLE: Answer = Answer {
    status: StatusCode::BAD_GATEWAY,
    text: "backend unavailable\n",
    close: false,
};

/// After `fault`, for a request that may (`retryable`) or may not be replayed.
pub fn after_failure(fault: Fault, retryable: bool) -> Next {
    match fault {
        Fault::ClientBody => Next::Answer(Answer {
            status: StatusCode::BAD_REQUEST,
            text: "malformed request body\n",
            close: true,
        }),
        Fault::Connect | Fault::Request if retryable => Next::Retry,
        Fault::Connect | Fault::Request => Next::Answer(UNAVAILABLE),
        Fault::Timeout => Next::Answer(Answer {
            status: StatusCode::GATEWAY_TIMEOUT,
            text: "backend did not answer in time\n",
            close: false,
        }),
    }
}

/// Whether a request may be replayed on another backend.
pub fn retryable(method: &Method, bodyless: bool, upgrade: bool) -> bool {
    is_idempotent(method) && bodyless && !upgrade
}

fn is_idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// How many attempts a request gets: one, plus `retries` when it may be replayed.
pub fn attempts(retryable: bool, retries: u32) -> usize {
    1 + if retryable { retries as usize } else { 0 }
}

/// Backend indexes a request has tried, without allocating for the usual few.
#[derive(Default, Debug)]
pub struct Tried {
    inline: [usize; 4],
    len: usize,
    more: Vec<usize>,
}

impl Tried {
    /// Records backend `i` as tried.
    pub fn push(&mut self, i: usize) {
        match self.inline.get_mut(self.len) {
            Some(slot) => *slot = i,
            None => self.more.push(i),
        }
        self.len += 1;
    }

    /// Whether backend `i` was tried.
    pub fn contains(&self, i: &usize) -> bool {
        self.inline[..self.len.min(4)].contains(i) || self.more.contains(i)
    }

    /// The backend tried last.
    pub fn last(&self) -> Option<usize> {
        match self.len {
            0 => None,
            n if n <= 4 => Some(self.inline[n - 1]),
            _ => self.more.last().copied(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_bodyless_idempotent_requests_without_upgrade_are_replayed() {
        assert!(retryable(&Method::GET, true, false));
        assert!(retryable(&Method::PUT, true, false));
        assert!(
            !retryable(&Method::POST, true, false),
            "POST is not idempotent"
        );
        assert!(
            !retryable(&Method::GET, false, false),
            "a streamed body cannot be replayed"
        );
        assert!(
            !retryable(&Method::GET, true, true),
            "an upgrade is not replayed"
        );
        assert_eq!(attempts(true, 2), 3);
        assert_eq!(attempts(false, 2), 1);
    }

    #[test]
    fn failures_before_an_answer_retry_timeouts_and_client_faults_do_not() {
        assert_eq!(after_failure(Fault::Connect, true), Next::Retry);
        assert_eq!(after_failure(Fault::Request, true), Next::Retry);
        assert_eq!(
            after_failure(Fault::Connect, false),
            Next::Answer(UNAVAILABLE)
        );
        let Next::Answer(Answer { status, close, .. }) = after_failure(Fault::Timeout, true) else {
            panic!("a timeout is never replayed")
        };
        assert_eq!((status, close), (StatusCode::GATEWAY_TIMEOUT, false));
        let Next::Answer(Answer { status, close, .. }) = after_failure(Fault::ClientBody, true)
        else {
            panic!("a broken client body is the client's fault")
        };
        assert_eq!((status, close), (StatusCode::BAD_REQUEST, true));
        assert_eq!(Fault::ClientBody.side(), "downstream");
        assert_eq!(Fault::Timeout.side(), "upstream");
    }

    #[test]
    fn tried_spills_past_four_and_remembers_the_last() {
        let mut t = Tried::default();
        assert_eq!(t.last(), None);
        for i in [7, 3, 9, 1, 5, 8] {
            t.push(i);
        }
        assert!(t.contains(&9) && t.contains(&8) && !t.contains(&2));
        assert_eq!(t.last(), Some(8));
    }
}
