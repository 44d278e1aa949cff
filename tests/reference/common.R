## Shared helpers for the reference scripts (sourced, not run directly).
options(digits = 17, warn = 1)

fmt17 <- function(x) {
  out <- sprintf("%.17g", x)
  out[is.na(x)] <- "NA"
  out
}

## Write a data.frame whose numeric columns are written with 17 significant
## digits (round-trippable doubles). First column is an id column.
write_ref <- function(df, path) {
  df <- as.data.frame(df, check.names = FALSE, stringsAsFactors = FALSE)
  for (j in seq_along(df)) {
    if (is.numeric(df[[j]]) && !is.integer(df[[j]])) df[[j]] <- fmt17(df[[j]])
  }
  write.table(df, path, sep = ",", quote = FALSE, row.names = FALSE,
              col.names = TRUE, na = "NA")
  invisible(path)
}

tight_ctrl <- function() {
  lme4::lmerControl(optimizer = "bobyqa",
                    optCtrl = list(rhoend = 1e-12, maxfun = 1e5),
                    check.conv.singular = "ignore")
}

## Fit and collect all warnings / messages as one string.
fit_capture <- function(expr) {
  msgs <- character(0)
  fit <- withCallingHandlers(expr,
    warning = function(w) { msgs <<- c(msgs, conditionMessage(w)); invokeRestart("muffleWarning") },
    message = function(m) { msgs <<- c(msgs, conditionMessage(m)); invokeRestart("muffleMessage") })
  list(fit = fit, msgs = msgs)
}

conv_messages <- function(fit, extra = character(0)) {
  m <- c(extra, fit@optinfo$conv$lme4$messages, fit@optinfo$warnings)
  m <- unique(unlist(m))
  if (length(m) == 0) "" else gsub("[,\n\r]", ";", paste(m, collapse = " | "))
}

## Conditional (posterior) covariance of the spherical->scaled random effects,
## computed directly: sigma^2 * Lambda (Lambda' Z' Z Lambda + I)^{-1} Lambda'.
## This is what lme4's condVar reports (fixed effects treated as known).
full_condvar <- function(fit) {
  Lt <- lme4::getME(fit, "Lambdat")
  Zt <- lme4::getME(fit, "Zt")
  LZ <- Lt %*% Zt
  q <- nrow(Lt)
  A <- as.matrix(LZ %*% Matrix::t(LZ)) + diag(q)
  L <- as.matrix(Matrix::t(Lt))
  sigma(fit)^2 * L %*% solve(A) %*% t(L)
}
