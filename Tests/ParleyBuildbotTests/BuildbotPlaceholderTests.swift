import Testing
@testable import ParleyWorkBuildbot

@Suite struct BuildbotPlaceholderTests {
    @Test func moduleLinks() { _ = BuildbotFrontEnd.self }
}
