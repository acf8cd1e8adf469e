import ArgumentParser

struct Bench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Benchmarks (see docs/performance.md).",
        discussion: "Not yet implemented in this build; see docs/performance.md for the plan."
    )

    func run() async throws {
        print("parley bench: not implemented yet (see docs/performance.md)")
        throw ExitCode(2)
    }
}
