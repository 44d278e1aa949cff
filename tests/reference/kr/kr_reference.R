## pbkrtest / lmerTest Kenward-Roger references for df_method="kenward-roger".
## Reads the small multi-gene study of tests/reference/anova (10 donors, 300 cells, 6 genes) and
## fits every gene by REML in four random-effects designs, plus the one-component and nested
## designs on the first 6 donors only ("one6", "nested6"), and random slopes (1 + x | donor).
## Writes, per design and gene:
##   vcov.csv     lme4's vcov and pbkrtest's vcovAdj (the adjusted covariance), entry by entry
##   lbddf.csv    pbkrtest::Lb_ddf for every coefficient and two contrasts, and the adjusted variance
##   anova.csv    lmerTest anova(type = 1, 2, 3, ddf = "Kenward-Roger")
##   lsmeans.csv  lmerTest ls_means / difflsmeans(ddf = "Kenward-Roger") of trt and ct:trt
## Run from the repository root:  Rscript tests/reference/kr/kr_reference.R
suppressMessages({library(lme4); library(lmerTest); library(pbkrtest)})
source("tests/reference/common.R")
out <- "tests/reference/kr"

cells <- read.csv("tests/reference/anova/cells.csv", stringsAsFactors = FALSE)
genes <- sprintf("g%02d", 1:6)
for (v in c("ct", "trt", "donor", "batch")) cells[[v]] <- factor(cells[[v]])
small <- droplevels(cells[cells$donor %in% sprintf("D%02d", 1:6), ])

random <- list(one = "(1 | donor)", nested = "(1 | donor) + (1 | donor:ct)",
               crossed = "(1 | donor) + (1 | batch)",
               three = "(1 | donor) + (1 | donor:ct) + (1 | batch)",
               one6 = "(1 | donor)", nested6 = "(1 | donor) + (1 | donor:ct)",
               slopes = "(1 + x | donor)")
fixed <- "ct * trt + x"

vc_rows <- list(); lb_rows <- list(); an_rows <- list(); ls_rows <- list(); fit_rows <- list()
tidy_ls <- function(tab, design, gene, pairwise) {
  d <- as.data.frame(tab, add_levels = TRUE)
  data.frame(design = design, gene = gene, pairwise = pairwise, term = d$term, level = d$levels,
             estimate = d$Estimate, se = d[["Std. Error"]], df = d$df, t = d[["t value"]],
             pvalue = d[["Pr(>|t|)"]], stringsAsFactors = FALSE)
}
for (design in names(random)) {
  data <- if (design %in% c("one6", "nested6")) small else cells
  for (gene in genes) {
    form <- as.formula(paste(gene, "~", fixed, "+", random[[design]]))
    fc <- fit_capture(lmer(form, data = data, REML = TRUE, control = tight_ctrl()))
    fit <- fc$fit
    fit_rows[[length(fit_rows) + 1]] <- data.frame(
      design = design, gene = gene, singular = isSingular(fit, tol = 1e-4),
      sigma2 = sigma(fit)^2, messages = conv_messages(fit, fc$msgs), stringsAsFactors = FALSE)
    Phi <- as.matrix(vcov(fit)); Vadj <- vcovAdj(fit); PhiA <- as.matrix(Vadj)
    nm <- colnames(Phi); p <- length(nm)
    vc_rows[[length(vc_rows) + 1]] <- data.frame(
      design = design, gene = gene, row = rep(nm, p), col = rep(nm, each = p),
      vcov = as.vector(Phi), vcov_adj = as.vector(PhiA), stringsAsFactors = FALSE)
    Ls <- lapply(seq_len(p), function(j) { v <- numeric(p); v[j] <- 1; v })
    names(Ls) <- nm
    c1 <- numeric(p); c1[nm == "ctB:trtT"] <- 1; c1[nm == "ctC:trtT"] <- -1
    c2 <- numeric(p); c2[nm == "trtT"] <- 1; c2[nm == "ctB:trtT"] <- 0.5; c2[nm == "ctC:trtT"] <- 0.5
    Ls[["ctB:trtT - ctC:trtT"]] <- c1; Ls[["trtT + (ctB:trtT + ctC:trtT)/2"]] <- c2
    for (lab in names(Ls)) {
      L <- matrix(Ls[[lab]], nrow = 1)
      lb_rows[[length(lb_rows) + 1]] <- data.frame(
        design = design, gene = gene, contrast = lab, estimate = sum(L * fixef(fit)),
        var_adj = drop(L %*% PhiA %*% t(L)), var = drop(L %*% Phi %*% t(L)),
        df = Lb_ddf(L, Phi, Vadj), stringsAsFactors = FALSE)
    }
    for (type in 1:3) {
      tab <- suppressMessages(anova(fit, type = type, ddf = "Kenward-Roger"))
      an_rows[[length(an_rows) + 1]] <- data.frame(
        design = design, gene = gene, type = type, term = rownames(tab), sum_sq = tab[["Sum Sq"]],
        mean_sq = tab[["Mean Sq"]], num_df = tab[["NumDF"]], den_df = tab[["DenDF"]],
        F = tab[["F value"]], pvalue = tab[["Pr(>F)"]], stringsAsFactors = FALSE)
    }
    for (trm in c("trt", "ct:trt")) {
      ls_rows[[length(ls_rows) + 1]] <- tidy_ls(ls_means(fit, which = trm, ddf = "Kenward-Roger"),
                                                design, gene, FALSE)
      ls_rows[[length(ls_rows) + 1]] <- tidy_ls(difflsmeans(fit, which = trm, ddf = "Kenward-Roger"),
                                                design, gene, TRUE)
    }
  }
}
write_ref(do.call(rbind, fit_rows), file.path(out, "fits.csv"))
write_ref(do.call(rbind, vc_rows), file.path(out, "vcov.csv"))
write_ref(do.call(rbind, lb_rows), file.path(out, "lbddf.csv"))
write_ref(do.call(rbind, an_rows), file.path(out, "anova.csv"))
write_ref(do.call(rbind, ls_rows), file.path(out, "lsmeans.csv"))
writeLines(c(R.version.string, paste("lme4", packageVersion("lme4")),
             paste("lmerTest", packageVersion("lmerTest")),
             paste("pbkrtest", packageVersion("pbkrtest")),
             paste("Matrix", packageVersion("Matrix"))), file.path(out, "versions.txt"))
