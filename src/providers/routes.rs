//! What Proxy may send to a provider: `(method, path template)` pairs, and how a request path matches one.

use std::fmt;

/// One call a provider module lets callers make through the vault.
///
/// A template is an origin-form path whose segments are literals, a
/// `{param}` that must equal the connection's stored parameter of that name,
/// or a final `*` standing for one or more further segments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    pub method: &'static str,
    pub template: &'static str,
}

impl Route {
    pub const fn get(template: &'static str) -> Self {
        Self {
            method: "GET",
            template,
        }
    }

    pub const fn post(template: &'static str) -> Self {
        Self {
            method: "POST",
            template,
        }
    }

    /// Whether `method path` fits this route, ignoring what placeholders
    /// hold; returns the `(param, raw segment)` pairs the placeholders took.
    /// `path` has no query and has passed the request checks (no empty or
    /// dot segments).
    pub fn bind<'p>(&self, method: &str, path: &'p str) -> Option<Vec<(&'static str, &'p str)>> {
        if self.method != method {
            return None;
        }
        let mut bound = Vec::new();
        let mut given = path.split('/');
        for want in self.template.split('/') {
            if want == "*" {
                // One or more further non-empty segments, to the end.
                let rest: Vec<&str> = given.by_ref().collect();
                return (!rest.is_empty() && rest.iter().all(|s| !s.is_empty())).then_some(bound);
            }
            let segment = given.next()?;
            match want.strip_prefix('{').and_then(|w| w.strip_suffix('}')) {
                Some(param) if !segment.is_empty() => bound.push((param, segment)),
                Some(_) => return None,
                None if want == segment => {}
                None => return None,
            }
        }
        given.next().is_none().then_some(bound)
    }
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.method, self.template)
    }
}

/// The route among `routes` that `method path` fits, with its placeholders' values.
pub fn find<'p>(
    routes: &'static [Route],
    method: &str,
    path: &'p str,
) -> Option<(&'static Route, Vec<(&'static str, &'p str)>)> {
    routes
        .iter()
        .find_map(|r| r.bind(method, path).map(|bound| (r, bound)))
}

#[cfg(test)]
mod tests {
    use super::*;

    static ROUTES: &[Route] = &[
        Route::get("/api/3/cohorts"),
        Route::post("/api/3/annotations"),
        Route::get("/api/2/taxonomy/*"),
        Route::get("/api/projects/{project_id}/annotations/"),
    ];

    fn name(method: &str, path: &str) -> Option<String> {
        find(ROUTES, method, path).map(|(r, _)| r.to_string())
    }

    #[test]
    fn literals_match_exactly() {
        assert_eq!(
            name("GET", "/api/3/cohorts").as_deref(),
            Some("GET /api/3/cohorts")
        );
        assert_eq!(name("POST", "/api/3/cohorts"), None);
        assert_eq!(name("GET", "/api/3/cohorts/"), None);
        assert_eq!(name("GET", "/api/3/cohorts/1"), None);
        assert_eq!(name("GET", "/api/3"), None);
        assert_eq!(name("GET", "/API/3/cohorts"), None);
    }

    #[test]
    fn a_star_takes_one_or_more_segments() {
        assert!(name("GET", "/api/2/taxonomy/category").is_some());
        assert!(name("GET", "/api/2/taxonomy/event/Signed%20Up").is_some());
        assert_eq!(name("GET", "/api/2/taxonomy"), None);
        assert_eq!(name("GET", "/api/2/taxonomy/"), None);
    }

    #[test]
    fn placeholders_report_what_they_took() {
        let (route, bound) = find(ROUTES, "GET", "/api/projects/42/annotations/").unwrap();
        assert_eq!(route.template, "/api/projects/{project_id}/annotations/");
        assert_eq!(bound, vec![("project_id", "42")]);
        assert_eq!(name("GET", "/api/projects//annotations/"), None);
        assert_eq!(name("GET", "/api/projects/42/annotations"), None);
    }
}
